//! End-to-end tests of the `tinygpt` binary, one test binary for the whole suite.

mod bad_recipes; // every kind of bad recipe or command line: exit 2, file:line:col, nothing run
mod caching; // reruns do only the work whose inputs changed; plan says why
mod cli; // help, dag, summary table, docs generated from the code
mod compare; // compare: a row per evaluated model, as a table, JSON and CSV; the run history
mod distill_align; // teacher logits, distill, preference data, reference log-probs, align; caching and resume
mod evaluate_tasks; // evaluate on raw text, multiple-choice and exact-match benchmarks, bad rows
mod export; // GGUF files checked by gguf-py and llama.cpp, the Hugging Face folder
mod finetune; // instructions and sft: LoRA adapters in PEFT layout, merged models, reruns, exact resume
mod formats; // text, JSONL, Parquet, pretrained tokenizers, bad data, real data when present
mod golden; // golden digests of every stage's output, golden diagnostics
mod hf_crosscheck; // models load in Hugging Face transformers and score the same loss
mod quantize; // calibrate and quantize: int8/int4 models evaluated and sampled, reports, determinism
mod remote; // a remote cache shared by stores: S3 (s3s-fs) or a directory; faults, damage, kills
mod report; // the HTML report: DAG, loss curves, compare table, samples; opened in headless Chromium
mod slurm; // stages as jobs of a real one-node Slurm cluster: same bytes, Ctrl-C, killed jobs
mod store; // kill -9, Ctrl-C, corruption, concurrent runs, gc
mod sweeps; // sweeps expand into members sharing upstream artifacts; recipes that extend others
mod tidy; // every source file opens with a module doc
mod training; // pretrain, evaluate, sample; exact resume; threads; divergence; shakespeare_char on real data
mod util;
