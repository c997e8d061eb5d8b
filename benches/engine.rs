//! Engine overhead as a user feels it, measured on the real binary:
//! - a no-op rerun of recipes/quickstart.toml (everything cached);
//! - `tinygpt plan` on a generated 200-stage recipe.
//!
//! Run with `cargo bench --bench engine`. Prints figures; asserts nothing about time.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn tinygpt(dir: &Path, args: &[&str]) -> f64 {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tinygpt")).current_dir(dir).args(args).output().unwrap();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ms
}

fn summary(mut samples: Vec<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    let median = samples[samples.len() / 2];
    format!(
        "median {median:.1} ms, min {:.1} ms, max {:.1} ms over {} runs",
        samples[0],
        samples[samples.len() - 1],
        samples.len()
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
    std::fs::copy(&recipe, dir.path().join("quickstart.toml")).unwrap();
    let first = tinygpt(dir.path(), &["run", "quickstart.toml"]);
    println!("quickstart first run (builds everything): {:.2} s", first / 1000.0);
    let reruns: Vec<f64> = (0..30).map(|_| tinygpt(dir.path(), &["run", "quickstart.toml"])).collect();
    println!("quickstart no-op rerun: {}", summary(reruns));

    // 100 tokenize stages on 100 small raw files, each feeding a pack stage: 200 stages.
    let mut text = String::from("[recipe]\nname = \"wide\"\n");
    for i in 0..100 {
        std::fs::write(dir.path().join(format!("part{i}.txt")), format!("part {i} ").repeat(200)).unwrap();
        text.push_str(&format!(
            "\n[stages.tok{i}]\nkind = \"tokenize\"\ninput = \"part{i}.txt\"\nalgorithm = \"byte\"\n\n[stages.pack{i}]\nkind = \"pack\"\ndata = \"tok{i}\"\nseq_len = 64\nsplit = \"position\"\n"
        ));
    }
    std::fs::write(dir.path().join("wide.toml"), text).unwrap();
    let plans: Vec<f64> = (0..30).map(|_| tinygpt(dir.path(), &["plan", "wide.toml"])).collect();
    println!("plan, 200-stage recipe, empty store: {}", summary(plans));
    tinygpt(dir.path(), &["run", "wide.toml"]);
    let plans: Vec<f64> = (0..30).map(|_| tinygpt(dir.path(), &["plan", "wide.toml"])).collect();
    println!("plan, 200-stage recipe, all cached:  {}", summary(plans));
}
