//! The guest's results and the summary. The runner in the guest writes, on the second serial
//! port, `@@VMTEST begin BIN NAME`, the test's own output, then
//! `@@VMTEST result BIN ok|failed|notrun|timeout MILLISECONDS NAME`, and `@@VMTEST done`
//! at the end.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;

/// Follows the results log while the guest runs and prints one line per finished test.
pub struct Tail {
    path: PathBuf,
    kernel: String,
    pos: u64,
    partial: String,
}

impl Tail {
    pub fn new(path: &Path, kernel: &str) -> Self {
        let _ = fs::remove_file(path);
        Self {
            path: path.into(),
            kernel: kernel.into(),
            pos: 0,
            partial: String::new(),
        }
    }

    pub fn poll(&mut self) {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.pos += n as u64;
        }
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            let line = line.trim_end();
            if let Some(r) = line.strip_prefix("@@VMTEST result ") {
                let f: Vec<&str> = r.splitn(4, ' ').collect();
                if let [bin, st, ms, name] = f[..] {
                    let secs = ms.parse::<f64>().unwrap_or(0.0) / 1000.0;
                    eprintln!("[{}] {st:>7} {bin}::{name} ({secs:.1} s)", self.kernel);
                }
            } else if let Some(k) = line.strip_prefix("@@VMTEST kernel ") {
                eprintln!("[{}] guest up: {k}", self.kernel);
            }
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Status {
    Passed,
    Failed(String),
    NotRun(String),
}

pub struct TestResult {
    pub binary: String,
    pub name: String,
    pub status: Status,
    pub secs: f64,
    pub output: Vec<String>,
}

pub struct Kernel {
    pub line: String,
    pub release: String,
    pub tests: Vec<TestResult>,
    /// How the guest ended, when it did not finish the run.
    pub problem: Option<String>,
    pub wall: Duration,
}

impl Kernel {
    pub fn from_log(
        line: &str,
        release: &str,
        results_log: &Path,
        console_log: &Path,
        expected: &[(String, String)],
        ended: String,
        wall: Duration,
    ) -> Result<Self> {
        let text = fs::read(results_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let mut tests: Vec<TestResult> = Vec::new();
        let mut current: Option<(String, String, Vec<String>)> = None;
        let mut done = false;
        for l in text.lines() {
            let l = l.trim_end_matches('\r');
            if let Some(r) = l.strip_prefix("@@VMTEST begin ") {
                if let Some((b, n)) = r.split_once(' ') {
                    current = Some((b.into(), n.into(), Vec::new()));
                }
            } else if let Some(r) = l.strip_prefix("@@VMTEST result ") {
                let f: Vec<&str> = r.splitn(4, ' ').collect();
                let [bin, st, ms, name] = f[..] else { continue };
                let output = current.take().map(|c| c.2).unwrap_or_default();
                let marker = output
                    .iter()
                    .find_map(|o| o.split_once("drain-tests: NOT RUN: "))
                    .map(|(_, why)| why.to_owned());
                let status = match st {
                    "ok" => Status::Passed,
                    "notrun" => Status::NotRun(marker.unwrap_or_else(|| "(no reason)".into())),
                    "timeout" => Status::Failed("killed at the per-test deadline".into()),
                    _ => Status::Failed(
                        output
                            .iter()
                            .rev()
                            .find(|o| o.contains("panicked at"))
                            .cloned()
                            .unwrap_or_else(|| "failed".into()),
                    ),
                };
                tests.push(TestResult {
                    binary: bin.into(),
                    name: name.into(),
                    status,
                    secs: ms.parse::<f64>().unwrap_or(0.0) / 1000.0,
                    output,
                });
            } else if l == "@@VMTEST done" {
                done = true;
            } else if let Some(c) = current.as_mut() {
                c.2.push(l.to_owned());
            }
        }
        let mut problem = None;
        if !done {
            let console = fs::read_to_string(console_log).unwrap_or_default();
            let last: Vec<&str> = console.lines().rev().take(15).collect();
            let why = format!(
                "the guest did not finish the run (QEMU {ended}); last console lines:\n{}",
                last.into_iter()
                    .rev()
                    .map(|l| format!("      | {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            if let Some((b, n, output)) = current {
                tests.push(TestResult {
                    binary: b,
                    name: n,
                    status: Status::Failed("the guest stopped during this test".into()),
                    secs: 0.0,
                    output,
                });
            }
            problem = Some(why);
        }
        for (b, n) in expected {
            if !tests.iter().any(|t| &t.binary == b && &t.name == n) {
                // A guest that finished without reporting a test the host listed ran
                // something else: that is a failure, not a test the kernel could not run.
                let status = if done {
                    Status::Failed("listed on the host, never reported by the guest".into())
                } else {
                    Status::NotRun("never reached: the guest stopped before it".into())
                };
                tests.push(TestResult {
                    binary: b.clone(),
                    name: n.clone(),
                    status,
                    secs: 0.0,
                    output: Vec::new(),
                });
            }
        }
        Ok(Self {
            line: line.into(),
            release: release.into(),
            tests,
            problem,
            wall,
        })
    }

    fn count(&self) -> (usize, usize, usize) {
        let p = self
            .tests
            .iter()
            .filter(|t| t.status == Status::Passed)
            .count();
        let f = self
            .tests
            .iter()
            .filter(|t| matches!(t.status, Status::Failed(_)))
            .count();
        (p, f, self.tests.len() - p - f)
    }

    fn failed(&self) -> bool {
        self.count().1 > 0 || self.problem.is_some()
    }
}

/// Prints the per-kernel details and the table; returns whether anything failed.
pub fn summary(
    kernels: &[Kernel],
    host_only: &[(String, String)],
    prepared: Duration,
    total: Duration,
) -> bool {
    eprintln!();
    for k in kernels {
        let (p, f, n) = k.count();
        eprintln!(
            "== kernel {} ({}): {p} passed, {f} failed, {n} not run, {:.0} s",
            k.line,
            k.release,
            k.wall.as_secs_f64()
        );
        for t in &k.tests {
            match &t.status {
                Status::Passed => {}
                Status::Failed(why) => {
                    eprintln!(
                        "   FAILED  {}::{} ({:.1} s): {why}",
                        t.binary, t.name, t.secs
                    );
                    // The panic and its message (what libtest prints after it is a
                    // backtrace); else the end of the output.
                    let lines: Vec<&String> = t.output.iter().filter(|l| !l.is_empty()).collect();
                    let from = lines
                        .iter()
                        .rposition(|l| l.contains("panicked at"))
                        .map_or(lines.len().saturating_sub(12), |i| i + 1);
                    for l in lines[from..]
                        .iter()
                        .take_while(|l| !l.starts_with("stack backtrace:"))
                        .take(12)
                    {
                        eprintln!("      | {l}");
                    }
                }
                Status::NotRun(why) => {
                    eprintln!("   NOT RUN {}::{}: {why}", t.binary, t.name);
                }
            }
        }
        if let Some(p) = &k.problem {
            eprintln!("   {p}");
        }
    }
    for (b, why) in host_only {
        eprintln!("   not in the guest suite: {b}: {why}");
    }
    eprintln!();
    eprintln!("| kernel | release | passed | failed | not run | seconds |");
    eprintln!("|---|---|---|---|---|---|");
    for k in kernels {
        let (p, f, n) = k.count();
        eprintln!(
            "| {} | {} | {p} | {f} | {n} | {:.0} |",
            k.line,
            k.release,
            k.wall.as_secs_f64()
        );
    }
    eprintln!(
        "vmtest: {:.0} s in all ({:.0} s building and preparing before the first boot)",
        total.as_secs_f64(),
        prepared.as_secs_f64()
    );
    let failed = kernels.iter().any(Kernel::failed);
    eprintln!(
        "vmtest: {}",
        if failed {
            "FAILED"
        } else {
            "ok on every kernel"
        }
    );
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A results log as the guest writes it (CRLF from the tty, the marker after libtest's
    /// `test NAME ... `), a guest that died during a test, and a test it never reached.
    #[test]
    fn parses_every_outcome() {
        let dir = std::env::temp_dir().join(format!("vmtest-report-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let results = dir.join("r.log");
        let console = dir.join("c.log");
        fs::write(
            &results,
            "@@VMTEST kernel 6.1.0\r\n\
             @@VMTEST begin a one\r\ntest one ... ok\r\n@@VMTEST result a ok 1500 one\r\n\
             @@VMTEST begin a two\r\ntest two ... drain-tests: NOT RUN: kernel 6.1.0: no TCX\r\n\
             @@VMTEST result a notrun 200 two\r\n\
             @@VMTEST begin a three\r\nthread 'three' panicked at x.rs:1:1:\r\nboom\r\n\
             @@VMTEST result a failed 300 three\r\n\
             @@VMTEST begin b four\r\nhalf a line",
        )
        .unwrap();
        fs::write(&console, "Kernel panic - not syncing\n").unwrap();
        let expected: Vec<(String, String)> = [("a", "one"), ("b", "four"), ("b", "five")]
            .iter()
            .map(|(b, n)| (b.to_string(), n.to_string()))
            .collect();
        let k = Kernel::from_log(
            "6.1",
            "6.1.0",
            &results,
            &console,
            &expected,
            "exited".into(),
            Duration::ZERO,
        )
        .unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let st = |n: &str| &k.tests.iter().find(|t| t.name == n).unwrap().status;
        assert_eq!(st("one"), &Status::Passed);
        assert_eq!(st("two"), &Status::NotRun("kernel 6.1.0: no TCX".into()));
        assert_eq!(
            st("three"),
            &Status::Failed("thread 'three' panicked at x.rs:1:1:".into())
        );
        assert!(matches!(st("four"), Status::Failed(w) if w.contains("stopped during")));
        assert!(matches!(st("five"), Status::NotRun(w) if w.contains("never reached")));
        assert!(k.problem.as_deref().unwrap().contains("Kernel panic"));
        assert_eq!(k.count(), (1, 2, 2));
        assert!(k.failed());
    }

    /// A guest that finished its run without a test the host listed (a renamed test, a
    /// filter the guest read differently) fails that kernel: a test never run is not a
    /// test the kernel could not run.
    #[test]
    fn a_finished_run_missing_a_listed_test_fails() {
        let dir = std::env::temp_dir().join(format!("vmtest-missing-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let results = dir.join("r.log");
        fs::write(
            &results,
            "@@VMTEST begin a one\ntest one ... ok\n@@VMTEST result a ok 10 one\n@@VMTEST done\n",
        )
        .unwrap();
        let expected = vec![
            ("a".to_string(), "one".to_string()),
            ("a".to_string(), "gone".to_string()),
        ];
        let k = Kernel::from_log(
            "5.10",
            "5.10.0",
            &results,
            &dir.join("none"),
            &expected,
            "exited".into(),
            Duration::ZERO,
        )
        .unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(k.problem.is_none());
        assert_eq!(k.count(), (1, 1, 0));
        assert!(k.failed());
    }
}
