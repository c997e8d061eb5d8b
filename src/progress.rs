//! Progress on stderr: an indicatif bar per running stage on a terminal, plain lines otherwise
//! (CI logs, pipes).

use std::io::IsTerminal;
use std::time::Duration;

use engine::{Observer, StageOutcome, StageProgress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    multi: MultiProgress,
    terminal: bool,
}

impl Progress {
    pub fn new() -> Self {
        let terminal = std::io::stderr().is_terminal();
        let target = if terminal { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Progress { multi: MultiProgress::with_draw_target(target), terminal }
    }

    fn line(&self, text: String) {
        if self.terminal {
            let _ = self.multi.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

pub struct Bar(ProgressBar);

impl Progress {
    /// A bar in bytes for moving one artifact to or from the remote cache.
    pub fn transfer(&self, name: &str, verb: &str, total: u64) -> Bar {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(style("bytes"));
        bar.set_prefix(name.to_string());
        bar.set_message(verb.to_string());
        if total > 0 {
            self.line(format!("{name:>12} {verb} ({})", crate::output::human_bytes(total)));
        } else {
            self.line(format!("{name:>12} {verb}"));
        }
        Bar(bar)
    }
}

fn style(unit: &'static str) -> ProgressStyle {
    let template = match unit {
        "bytes" => "{prefix:>12.bold} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        _ => "{prefix:>12.bold} {bar:30} {human_pos}/{human_len} {per_sec} ETA {eta} {msg}",
    };
    ProgressStyle::with_template(template).expect("templates are valid")
}

impl StageProgress for Bar {
    fn set_length(&self, total: u64, unit: &'static str) {
        self.0.set_style(style(unit));
        self.0.set_length(total);
    }
    fn set_position(&self, done: u64) {
        self.0.set_position(done);
    }
    fn inc(&self, delta: u64) {
        self.0.inc(delta);
    }
    fn set_message(&self, message: &str) {
        self.0.set_message(message.to_string());
    }
}

impl Observer for Progress {
    fn stage_started(&self, name: &str, kind: &str) -> Box<dyn StageProgress> {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("{prefix:>12.bold} {spinner} {elapsed} {msg}").expect("valid"));
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        self.line(format!("{name:>12} running ({kind})"));
        Box::new(Bar(bar))
    }
    fn stage_downloading(&self, name: &str) -> Box<dyn StageProgress> {
        Box::new(self.transfer(name, "downloading from the remote cache", 0))
    }
    fn warning(&self, message: &str) {
        self.line(format!("warning: {message}"));
    }
    fn stage_waiting(&self, name: &str) {
        self.line(format!("{name:>12} waiting: another tinygpt process is building this artifact"));
    }
    fn stage_finished(&self, outcome: &StageOutcome) {
        if outcome.action == engine::Action::Run {
            self.line(format!("{:>12} done in {:.2} s", outcome.name, outcome.seconds));
        }
    }
    fn stage_failed(&self, name: &str, error: &str) {
        self.line(format!("{name:>12} failed: {error}"));
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let _ = self.multi.clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}
