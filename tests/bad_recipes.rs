//! Every kind of bad recipe or command line: exit code 2, a message naming the file, line,
//! column and key, and nothing run (issue 2, item 1).

use crate::util::Sandbox;

const GOOD: &str = r#"[recipe]
name = "bad"

[stages.corpus]
kind = "corpus"
n_bytes = 10_000

[stages.tokenize]
kind = "tokenize"
input = "corpus"
algorithm = "byte"

[stages.pack]
kind = "pack"
data = "tokenize"
seq_len = 16
"#;

/// Write GOOD with one replacement, run `plan` and `run` on it, and check both refuse it with
/// exit code 2 and a message containing every `expected` fragment.
fn refused(replace: &str, with: &str, extra: &[&str], expected: &[&str]) -> String {
    let sb = Sandbox::new();
    assert!(GOOD.contains(replace), "fixture lacks {replace:?}");
    sb.write("bad.toml", GOOD.replacen(replace, with, 1));
    let mut last = String::new();
    for command in ["plan", "run"] {
        let mut args = vec![command, "bad.toml"];
        args.extend_from_slice(extra);
        let out = sb.tinygpt(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{command} must exit 2:\n{stderr}");
        for fragment in expected {
            assert!(stderr.contains(fragment), "missing {fragment:?} in:\n{stderr}");
        }
        assert!(
            !sb.store().join("objects").exists() || std::fs::read_dir(sb.store().join("objects")).unwrap().count() == 0
        );
        last = stderr;
    }
    last
}

#[test]
fn toml_syntax_errors_point_at_the_line() {
    refused("seq_len = 16", "seq_len = ", &[], &["invalid recipe", "bad.toml:16:"]);
}

#[test]
fn unknown_keys_are_errors_with_a_suggestion() {
    refused(
        "seq_len = 16",
        "seq_lne = 16",
        &[],
        &["unknown key `seq_lne` for stage `pack`", "bad.toml:16:1", "did you mean `seq_len`?"],
    );
}

#[test]
fn wrong_types_say_what_was_expected() {
    refused(
        "seq_len = 16",
        "seq_len = \"long\"",
        &[],
        &["`seq_len` of stage `pack`: expected integer", "found string \"long\"", "bad.toml:16:11"],
    );
}

#[test]
fn unknown_stage_kinds_list_the_known_ones() {
    refused(
        "kind = \"pack\"",
        "kind = \"pakc\"",
        &[],
        &[
            "unknown stage kind `pakc`",
            "bad.toml:14:8",
            "did you mean `pack`?",
            "align, calibrate, corpus, distill, evaluate, export, generate, instructions, pack, preferences, pretrain, quantize, reference, sft, teacher, tokenize",
        ],
    );
}

#[test]
fn an_input_naming_no_stage_is_an_error() {
    refused(
        "data = \"tokenize\"",
        "data = \"tokenise\"",
        &[],
        &[
            "input `data` of stage `pack` names an unknown stage `tokenise`",
            "bad.toml:15:8",
            "did you mean `tokenize`?",
        ],
    );
}

#[test]
fn a_missing_raw_file_is_an_error() {
    refused(
        "input = \"corpus\"",
        "input = \"missing.txt\"",
        &[],
        &["names no stage and no file `missing.txt`", "bad.toml:10:9"],
    );
}

#[test]
fn a_cycle_is_printed() {
    let cycle = r#"[recipe]
name = "cycle"

[stages.a]
kind = "pack"
data = "b"

[stages.b]
kind = "pack"
data = "c"

[stages.c]
kind = "pack"
data = "a"
"#;
    let sb = Sandbox::new();
    sb.write("cycle.toml", cycle);
    let out = sb.tinygpt(&["run", "cycle.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("the recipe has a cycle: a -> b -> c -> a"), "{err}");
    assert!(err.contains("cycle.toml:6:8"), "{err}");
}

#[test]
fn a_wired_artifact_of_the_wrong_type_is_refused_at_plan_time() {
    refused(
        "data = \"tokenize\"",
        "data = \"corpus\"",
        &[],
        &["input `data` of stage `pack` takes tokens, but stage `corpus` produces text", "bad.toml:15:8"],
    );
}

#[test]
fn a_vocabulary_smaller_than_the_alphabet_is_refused() {
    refused(
        "algorithm = \"byte\"",
        "algorithm = \"bpe\"\nvocab_size = 100",
        &[],
        &["vocab_size 100 is smaller than the alphabet", "bad.toml:12:1"],
    );
}

#[test]
fn a_stage_without_kind_or_a_recipe_without_header_is_refused() {
    refused("kind = \"corpus\"\n", "", &[], &["stage `corpus` has no `kind`", "bad.toml:4:9"]);
    refused("[recipe]\nname = \"bad\"\n", "", &[], &["missing field `recipe`"]);
}

#[test]
fn a_seed_on_a_kind_that_does_not_use_one_is_refused() {
    refused(
        "algorithm = \"byte\"",
        "algorithm = \"byte\"\nseed = 3",
        &[],
        &["stage kind `tokenize` does not use a seed", "bad.toml:12:1"],
    );
}

#[test]
fn shards_that_do_not_divide_the_batch_are_refused() {
    let pretrain = "seq_len = 16\n\n[stages.train]\nkind = \"pretrain\"\ndata = \"pack\"\nbatch_size = 4\nshards = 3\n";
    refused(
        "seq_len = 16\n",
        pretrain,
        &[],
        &["stage `train`: 3 shards do not split batch_size 4", "bad.toml:22:1", "`shards`"],
    );
}

#[test]
fn set_is_validated_like_the_recipe() {
    let err = refused(
        "seq_len = 16",
        "seq_len = 16",
        &["--set", "pakc.seq_len=3"],
        &["no stage named `pakc`", "--set:1:1", "did you mean `pack`?"],
    );
    assert!(err.contains("pakc.seq_len=3"), "the override is quoted: {err}");
    refused(
        "seq_len = 16",
        "seq_len = 16",
        &["--set", "pack.seq_len=abc"],
        &["`seq_len` of stage `pack`: expected integer", "found string \"abc\"", "--set:1:14"],
    );
    refused(
        "seq_len = 16",
        "seq_len = 16",
        &["--set", "pack.sequence=3"],
        &["unknown key `sequence` for stage `pack`", "--set:1:6"],
    );
    refused(
        "seq_len = 16",
        "seq_len = 16",
        &["--set", "tokenize.input=nowhere.txt"],
        &["names no stage and no file `nowhere.txt`"],
    );
    refused("seq_len = 16", "seq_len = 16", &["--set", "pack"], &["not of the form STAGE.KEY=VALUE"]);
}

#[test]
fn bad_command_lines_exit_2() {
    let sb = Sandbox::new();
    assert_eq!(sb.tinygpt(&["run"]).status.code(), Some(2));
    assert_eq!(sb.tinygpt(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(sb.tinygpt(&["dag", "tiny.toml", "--format", "png"]).status.code(), Some(2));
    let missing = sb.tinygpt(&["run", "nope.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read recipe `nope.toml`"));
}

/// The full rendering of one diagnostic, kept as a golden file so a change in how errors look
/// is reviewed like code. `UPDATE_GOLDEN=1 cargo test` rewrites it.
#[test]
fn diagnostics_render_as_in_the_golden_file() {
    let text = refused("data = \"tokenize\"", "data = \"pakc\"", &[], &[]);
    crate::golden::check("diagnostic_unknown_stage.txt", &text);
}

#[test]
fn executor_tables_are_checked_like_stages() {
    refused(
        "[stages.corpus]",
        "[executor]\ncpu = 2\n\n[stages.corpus]",
        &[],
        &["unknown key `cpu` in the `[executor]` table", "bad.toml:5:1", "did you mean `cpus`?"],
    );
    refused(
        "seq_len = 16",
        "seq_len = 16\nexecutor = { cpus = 0 }",
        &[],
        &["`cpus` in `executor` of stage `pack` must be a positive integer", "bad.toml:17:12"],
    );
    refused("seq_len = 16", "seq_len = 16\nexecutor = 4", &[], &["must be a table of partition, time, cpus, mem"]);
}
