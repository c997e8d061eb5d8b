//! `corpus`: a deterministic built-in corpus made from the seed, so that the quickstart runs on
//! a fresh machine with no download. Short children's stories and arithmetic question/answer
//! drills, one document per line of `corpus.jsonl` (`{"text": ...}`).
//!
//! The generator is a template grammar driven by [`SplitMix64`]: the same seed and size give
//! the same bytes on every machine and every version until `VERSION` is bumped.

use std::io::{BufWriter, Write};

use engine::{InputSpec, Metrics, ParamSpec, Stage, StageCtx, StageError};
use serde_json::json;

use crate::nn::rng::SplitMix64;
use crate::{fail, TEXT};

pub struct Corpus;

pub const FILE: &str = "corpus.jsonl";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::int("n_bytes", 4_000_000, 1_000, 1 << 34, "approximate size of the text in bytes (whole documents)"),
    ParamSpec::float("arithmetic_fraction", 0.3, 0.0, 1.0, "share of documents that are arithmetic drills"),
];

impl Stage for Corpus {
    fn kind(&self) -> &'static str {
        "corpus"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "generate a deterministic corpus of short stories and arithmetic drills from the seed"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        &[]
    }
    fn output(&self) -> engine::ArtifactType {
        TEXT
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let target = ctx.params().usize("n_bytes");
        let arithmetic = ctx.params().float("arithmetic_fraction");
        let path = ctx.out(FILE);
        let err = |e: &dyn std::error::Error| fail(format!("writing `{}`", path.display()))(e);
        let mut out = BufWriter::new(std::fs::File::create(&path).map_err(|e| err(&e))?);
        let progress = ctx.progress();
        progress.set_length(target as u64, "bytes");
        let mut rng = SplitMix64::new(ctx.seed());
        let (mut written, mut docs, mut stories) = (0usize, 0u64, 0u64);
        let mut text = String::new();
        while written < target {
            text.clear();
            if rng.unit() < arithmetic {
                arithmetic_drill(&mut rng, &mut text);
            } else {
                story(&mut rng, &mut text);
                stories += 1;
            }
            serde_json::to_writer(&mut out, &json!({ "text": text })).expect("a string always serializes");
            out.write_all(b"\n").map_err(|e| err(&e))?;
            written += text.len();
            docs += 1;
            if docs % 256 == 0 {
                progress.set_position(written as u64);
                ctx.check_cancelled()?;
            }
        }
        out.flush().map_err(|e| err(&e))?;
        Ok(Metrics::from([
            ("documents".into(), json!(docs)),
            ("stories".into(), json!(stories)),
            ("text_bytes".into(), json!(written)),
        ]))
    }
}

struct Hero {
    name: &'static str,
    they: &'static str,
    their: &'static str,
}

const HEROES: &[Hero] = &[
    Hero { name: "Lily", they: "she", their: "her" },
    Hero { name: "Tom", they: "he", their: "his" },
    Hero { name: "Mia", they: "she", their: "her" },
    Hero { name: "Ben", they: "he", their: "his" },
    Hero { name: "Sara", they: "she", their: "her" },
    Hero { name: "Max", they: "he", their: "his" },
    Hero { name: "Anna", they: "she", their: "her" },
    Hero { name: "Leo", they: "he", their: "his" },
    Hero { name: "Zoe", they: "she", their: "her" },
    Hero { name: "Sam", they: "he", their: "his" },
    Hero { name: "Nora", they: "she", their: "her" },
    Hero { name: "Finn", they: "he", their: "his" },
];
const FRIENDS: &[&str] = &["dog", "cat", "bird", "frog", "rabbit", "duck", "bear", "mouse"];
const PLACES: &[&str] = &["park", "garden", "beach", "forest", "kitchen", "farm", "river", "hill"];
const THINGS: &[&str] =
    &["ball", "kite", "red box", "little boat", "book", "hat", "toy car", "shell", "flower", "drum"];
const FEELINGS: &[&str] = &["happy", "sad", "scared", "excited", "tired", "proud", "surprised"];
const WEATHER: &[&str] = &["sunny", "rainy", "windy", "cold", "warm", "cloudy"];
const PROBLEMS: &[&str] = &[
    "the {thing} fell into the water",
    "the {thing} got stuck in a tall tree",
    "a strong wind took the {thing} away",
    "the {friend} hid the {thing} under a rock",
    "the {thing} broke into two pieces",
];
const FIXES: &[&str] = &[
    "{name} asked {their} mom for help, and together they got the {thing} back",
    "the {friend} helped {name} find the {thing}",
    "{name} tried again and again, and at last {they} fixed the {thing}",
    "a kind old man gave {name} a new {thing}",
];
const LESSONS: &[&str] = &[
    "It is good to ask for help.",
    "Friends make hard things easy.",
    "Never give up.",
    "Sharing makes everyone happy.",
    "Be kind, and kindness comes back.",
];

fn fill(template: &str, hero: &Hero, friend: &str, thing: &str) -> String {
    template
        .replace("{name}", hero.name)
        .replace("{they}", hero.they)
        .replace("{their}", hero.their)
        .replace("{friend}", friend)
        .replace("{thing}", thing)
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

fn story(rng: &mut SplitMix64, out: &mut String) {
    let hero = rng.pick(HEROES);
    let friend = *rng.pick(FRIENDS);
    let place = *rng.pick(PLACES);
    let thing = *rng.pick(THINGS);
    let weather = *rng.pick(WEATHER);
    let opening = match rng.below(3) {
        0 => format!(
            "Once upon a time, there was a little {} named {}.",
            if hero.they == "she" { "girl" } else { "boy" },
            hero.name
        ),
        1 => format!("One {weather} day, {} went to the {place}.", hero.name),
        _ => format!("{} had a {friend} and a {thing}.", hero.name),
    };
    out.push_str(&opening);
    out.push_str(&format!(" {} loved to play with {} {thing}.", capitalize(hero.they), hero.their));
    out.push_str(&format!(" At the {place}, {} met a {friend}.", hero.name));
    out.push_str(&format!(" The {friend} was {}.", rng.pick(FEELINGS)));
    out.push('\n');
    let problem: &&str = rng.pick(PROBLEMS);
    let problem = fill(problem, hero, friend, thing);
    out.push_str(&format!("But then {problem}. {} felt {}.", hero.name, rng.pick(FEELINGS)));
    let fix: &&str = rng.pick(FIXES);
    let fix = fill(fix, hero, friend, thing);
    out.push_str(&format!(" Then {fix}."));
    out.push('\n');
    out.push_str(&format!("{} was {} again. ", hero.name, rng.pick(&["happy", "proud", "glad"])));
    let lesson: &&str = rng.pick(LESSONS);
    out.push_str(lesson);
}

fn arithmetic_drill(rng: &mut SplitMix64, out: &mut String) {
    let n = 4 + rng.below(6);
    for i in 0..n {
        if i > 0 {
            out.push('\n');
        }
        let (a, b) = (rng.below(100) as i64, rng.below(100) as i64);
        match rng.below(4) {
            0 => out.push_str(&format!("Q: What is {a} + {b}?\nA: {}", a + b)),
            1 => out.push_str(&format!("Q: What is {} - {}?\nA: {}", a.max(b), a.min(b), a.max(b) - a.min(b))),
            2 => {
                let (a, b) = (a % 13, b % 13);
                out.push_str(&format!("Q: What is {a} times {b}?\nA: {}", a * b))
            }
            _ => {
                let hero = rng.pick(HEROES);
                let thing = rng.pick(&["apples", "stickers", "marbles", "cookies", "pencils"]);
                let (have, more) = (a % 20 + 1, b % 10 + 1);
                out.push_str(&format!(
                    "Q: {} has {have} {thing}. {} gets {more} more. How many {thing} does {} have now?\nA: {}",
                    hero.name,
                    capitalize(hero.they),
                    hero.name,
                    have + more
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_answers_are_right() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..50 {
            let mut text = String::new();
            arithmetic_drill(&mut rng, &mut text);
            for pair in text.split("\nQ: ").map(|p| p.trim_start_matches("Q: ")) {
                let (q, a) = pair.split_once("\nA: ").unwrap();
                let answer: i64 = a.parse().unwrap();
                let nums: Vec<i64> = q
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().unwrap())
                    .collect();
                let expect = if q.contains(" + ") || q.contains("more") {
                    nums[0] + nums[1]
                } else if q.contains(" - ") {
                    nums[0] - nums[1]
                } else {
                    nums[0] * nums[1]
                };
                assert_eq!(answer, expect, "{q}");
            }
        }
    }

    #[test]
    fn stories_read_as_sentences() {
        let mut rng = SplitMix64::new(1);
        let mut text = String::new();
        story(&mut rng, &mut text);
        assert!(text.ends_with('.'), "{text}");
        assert!(!text.contains('{'), "every placeholder is filled: {text}");
    }
}
