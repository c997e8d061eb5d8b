//! `tokenize`: documents in, a Hugging Face `tokenizer.json` and token ids per document out.
//!
//! Four tokenizers, all expressed as Hugging Face tokenizers so that Python users load the
//! output unchanged, and all encoding through the `tokenizers` crate so the ids written always
//! agree with the `tokenizer.json` written beside them:
//! - `byte`: 256 byte tokens (byte-level, no merges);
//! - `char`: the sorted set of characters in the corpus (no merges);
//! - `bpe`: byte-level BPE trained on the corpus (GPT-2 style pre-tokenization);
//! - `pretrained`: an existing `tokenizer.json` from the `tokenizer` input.
//!
//! Special tokens get the ids after the base vocabulary (`byte`, `char`) or the first ids
//! (`bpe`, as the Hugging Face trainer assigns them).

use std::collections::BTreeSet;

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use rayon::prelude::*;
use serde_json::json;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::arrow_io::{write_docs, TokenDocs, TokenMeta};
use crate::text_source::{read_documents, Format, SourceOptions, FORMAT_CHOICES};
use crate::{fail, TEXT, TOKENS};

pub struct Tokenize;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENS_FILE: &str = "tokens.arrow";

/// Byte-level BPE starts from the 256 byte symbols.
const BYTE_ALPHABET: i64 = 256;

const PARAMS: &[ParamSpec] = &[
    ParamSpec::choice("algorithm", "bpe", &["byte", "char", "bpe", "pretrained"], "which tokenizer to build"),
    ParamSpec::int("vocab_size", 4096, 1, 1 << 20, "vocabulary size for `bpe`, special tokens included"),
    ParamSpec::int("min_frequency", 2, 1, 1 << 30, "`bpe`: a pair merges only if it occurs this often"),
    ParamSpec::str_list("special_tokens", &["<|endoftext|>"], "tokens never split; `byte`, `char`, `bpe` only"),
    ParamSpec::string("eot_token", Some("<|endoftext|>"), "the end-of-text token `pack` puts between documents"),
    ParamSpec::choice("format", "auto", FORMAT_CHOICES, "input format; `auto` goes by file extension"),
    ParamSpec::string("field", Some("text"), "JSONL field or Parquet column holding the text"),
    ParamSpec::string(
        "doc_separator",
        None,
        "split text files into documents at this string (default: one document per file)",
    ),
    ParamSpec::int("chunk_docs", 64, 1, 1 << 20, "documents per parallel work item (speed only)").not_hashed(),
];

const INPUTS: &[InputSpec] = &[
    InputSpec {
        name: "input",
        accepts: Accepts::RawOrArtifact(&[TEXT]),
        required: true,
        doc: "text: a file, a directory of files, or a `corpus` stage",
    },
    InputSpec {
        name: "tokenizer",
        accepts: Accepts::Raw,
        required: false,
        doc: "a Hugging Face tokenizer.json, for `algorithm = \"pretrained\"`",
    },
];

impl Stage for Tokenize {
    fn kind(&self) -> &'static str {
        "tokenize"
    }
    fn version(&self) -> u32 {
        2
    }
    fn about(&self) -> &'static str {
        "build or load a tokenizer and encode every document (text, JSONL or Parquet) in parallel"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        TOKENS
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::Own
    }

    fn check(&self, params: &Params, connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        let algorithm = params.str("algorithm");
        let pretrained = algorithm == "pretrained";
        if pretrained && !connected.contains("tokenizer") {
            return Err(ParamProblem::new(
                "algorithm",
                "`pretrained` needs the `tokenizer` input: a path to a tokenizer.json",
            ));
        }
        if !pretrained && connected.contains("tokenizer") {
            return Err(ParamProblem::new(
                "tokenizer",
                format!("a `tokenizer` file is used only with algorithm = \"pretrained\", not \"{algorithm}\""),
            ));
        }
        let specials = params.str_list("special_tokens");
        let eot = params.str("eot_token");
        if !pretrained && !specials.iter().any(|s| s == eot) {
            return Err(ParamProblem::new("eot_token", format!("`{eot}` is not one of `special_tokens`")));
        }
        if algorithm == "bpe" {
            let vocab = params.int("vocab_size");
            let needed = BYTE_ALPHABET + specials.len() as i64;
            if vocab < needed {
                return Err(ParamProblem::new(
                    "vocab_size",
                    format!(
                        "vocab_size {vocab} is smaller than the alphabet: byte-level BPE needs {BYTE_ALPHABET} byte tokens plus {} special tokens = {needed}",
                        specials.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let p = ctx.params();
        let progress = ctx.progress();
        progress.set_message("reading documents");
        let opts = SourceOptions {
            format: Format::named(p.str("format")),
            field: p.str("field"),
            doc_separator: p.opt_str("doc_separator"),
        };
        let input = ctx.required_input("input");
        let docs = read_documents(input, &opts)?;
        ctx.check_cancelled()?;

        progress.set_message("building tokenizer");
        let tokenizer = build_tokenizer(p, ctx.input("tokenizer"), &docs, &|| ctx.check_cancelled().is_err())?;
        let eot = p.str("eot_token");
        let eot_id = tokenizer.token_to_id(eot).ok_or_else(|| {
            StageError::msg(format!("the tokenizer has no token `{eot}`: set `eot_token` to one of its special tokens"))
        })?;
        let vocab_size = tokenizer.get_vocab_size(true) as u32;
        ctx.check_cancelled()?;

        progress.set_message("encoding");
        let tokens = encode_all(&tokenizer, &docs, p.usize("chunk_docs"), ctx)?;
        match ctx.input("tokenizer") {
            // Keep the user's file byte for byte.
            Some(Input::Raw { path, .. }) => std::fs::copy(path, ctx.out(TOKENIZER_FILE)).map(drop),
            _ => std::fs::write(
                ctx.out(TOKENIZER_FILE),
                tokenizer.to_string(true).map_err(|e| fail("serializing the tokenizer")(&*e))?,
            ),
        }
        .map_err(|e| fail("writing tokenizer.json")(&e))?;
        write_docs(&ctx.out(TOKENS_FILE), &tokens)?;
        TokenMeta { vocab_size, eot_id, seq_len: None }.write(ctx.out_dir())?;

        let bytes: usize = docs.iter().map(String::len).sum();
        Ok(Metrics::from([
            ("documents".into(), json!(docs.len())),
            ("tokens".into(), json!(tokens.values.len())),
            ("vocab_size".into(), json!(vocab_size)),
            ("bytes_per_token".into(), json!(round3(bytes as f64 / tokens.values.len().max(1) as f64))),
        ]))
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn specials(p: &Params) -> Vec<AddedToken> {
    p.str_list("special_tokens").iter().map(|s| AddedToken::from(s.clone(), true)).collect()
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to 256 + n.
/// Byte-level tokenizers store byte `b` as this character.
pub(crate) fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|x| !printable(*x)).count() as u32;
    char::from_u32(256 + n).expect("256 + n < 512 is a valid char")
}

/// A model with a fixed vocabulary and no merges: every symbol is one token.
fn fixed_vocab(symbols: impl IntoIterator<Item = String>) -> Result<BPE, StageError> {
    let vocab: tokenizers::models::bpe::Vocab = symbols.into_iter().enumerate().map(|(i, s)| (s, i as u32)).collect();
    BPE::builder().vocab_and_merges(vocab, vec![]).build().map_err(|e| fail("building the vocabulary")(&*e))
}

/// A byte-level tokenizer whose ids are the bytes, for tests of stages that take a model's
/// tokenizer and for `tinygpt bench`'s decoding.
pub(crate) fn byte_tokenizer() -> Tokenizer {
    let mut t = Tokenizer::new(fixed_vocab((0..=255u8).map(|b| byte_char(b).to_string())).expect("a fixed vocabulary"));
    t.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
    t.with_decoder(Some(ByteLevel::new(false, false, false)));
    t
}

/// Builds the tokenizer `algorithm` names. BPE training reads the documents while `stop()` is
/// false and returns `Interrupted` once it is true: an interrupt ends the counting of pairs at
/// the next document, and the merges then run on the little counted so far. (The Hugging Face
/// trainer cannot be stopped inside its merge loop: an interrupt that comes after the counting
/// waits for it.)
fn build_tokenizer(
    p: &Params,
    tokenizer_file: Option<&Input>,
    docs: &[String],
    stop: &(dyn Fn() -> bool + Sync),
) -> Result<Tokenizer, StageError> {
    let tokenizer = match p.str("algorithm") {
        "byte" => {
            let mut t = Tokenizer::new(fixed_vocab((0..=255u8).map(|b| byte_char(b).to_string()))?);
            t.with_pre_tokenizer(Some(ByteLevel::new(false, false, false)));
            t.with_decoder(Some(ByteLevel::new(false, false, false)));
            t.add_special_tokens(&specials(p));
            t
        }
        "char" => {
            let chars: BTreeSet<char> =
                docs.par_iter().map(|d| d.chars().collect::<BTreeSet<_>>()).reduce(BTreeSet::new, |mut a, b| {
                    a.extend(b);
                    a
                });
            let mut t = Tokenizer::new(fixed_vocab(chars.into_iter().map(String::from))?);
            // Without a decoder, decoding joins tokens with spaces.
            t.with_decoder(Some(Fuse::new()));
            t.add_special_tokens(&specials(p));
            t
        }
        "bpe" => {
            let mut t = Tokenizer::new(BPE::default());
            t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            t.with_decoder(Some(ByteLevel::new(false, true, true)));
            let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
                .vocab_size(p.usize("vocab_size"))
                .min_frequency(p.int("min_frequency") as u64)
                .special_tokens(specials(p))
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .show_progress(false)
                .build()
                .into();
            let trained = t.train(&mut trainer, docs.iter().take_while(|_| !stop()));
            if stop() {
                return Err(StageError::Interrupted);
            }
            trained.map_err(|e| fail("training BPE")(&*e))?;
            t
        }
        "pretrained" => {
            let Some(Input::Raw { path, shown }) = tokenizer_file else {
                unreachable!("`check` requires the tokenizer input for `pretrained`");
            };
            Tokenizer::from_file(path)
                .map_err(|e| StageError::msg(format!("`{shown}` is not a Hugging Face tokenizer.json: {e}")))?
        }
        other => unreachable!("algorithm `{other}` is not among the declared choices"),
    };
    Ok(tokenizer)
}

/// Encode documents in parallel, in chunks of a fixed size; the result is in document order
/// whatever the number of threads. Each chunk's ids are copied once, into the flat result.
pub fn encode_all(
    tokenizer: &Tokenizer,
    docs: &[String],
    chunk: usize,
    ctx: &StageCtx<'_>,
) -> Result<TokenDocs, StageError> {
    let progress = ctx.progress();
    progress.set_length(docs.len() as u64, "docs");
    let chunks: Vec<Vec<Vec<u32>>> = docs
        .par_chunks(chunk)
        .map(|chunk| {
            ctx.check_cancelled()?;
            let ids = chunk
                .iter()
                .map(|d| tokenizer.encode_fast(d.as_str(), false).map(|e| e.get_ids().to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail("encoding")(&*e))?;
            progress.inc(chunk.len() as u64);
            Ok(ids)
        })
        .collect::<Result<_, StageError>>()?;
    let mut tokens = TokenDocs::default();
    chunks.iter().flatten().for_each(|doc| tokens.push(doc));
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_match_the_byte_level_alphabet() {
        let ours: BTreeSet<char> = (0..=255u8).map(byte_char).collect();
        let theirs: BTreeSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours, theirs);
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), '\u{120}'); // GPT-2's "Ġ"
    }

    #[test]
    fn every_algorithm_decodes_back_to_the_text() {
        let docs = vec!["Hello, wörld!\nTo be, or not to be.".to_string(); 3];
        for algorithm in ["byte", "char", "bpe"] {
            let p = Params::from_defaults(
                PARAMS,
                &[
                    ("algorithm", engine::ParamValue::Str(algorithm.into())),
                    ("vocab_size", engine::ParamValue::Int(300)),
                ],
            );
            let t = build_tokenizer(&p, None, &docs, &|| false).unwrap();
            let ids = t.encode_fast(docs[0].as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(t.decode(&ids, false).unwrap(), docs[0], "{algorithm}");
        }
    }

    #[test]
    fn an_interrupt_stops_bpe_training_at_the_next_document() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let docs: Vec<String> = (0..1000).map(|i| format!("document {i}: the quick brown fox")).collect();
        let p = Params::from_defaults(PARAMS, &[("algorithm", engine::ParamValue::Str("bpe".into()))]);
        // The user presses Ctrl-C while the trainer reads the 10th document.
        let asked = AtomicUsize::new(0);
        let stop = || asked.fetch_add(1, Ordering::SeqCst) >= 10;
        let result = build_tokenizer(&p, None, &docs, &stop);
        assert!(matches!(result, Err(StageError::Interrupted)), "an interrupted training must not return a tokenizer");
        // One question per document read, one more that ended the reading, one after training.
        assert_eq!(asked.load(Ordering::SeqCst), 12, "the trainer went on reading after the interrupt");
    }
}
