//! What a bench run found: sections of rows measured side by side, the targets they are held
//! to, and the machine they ran on; written as markdown (stdout and `bench/results.md`) and
//! JSON (`bench/results.json`).

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;

/// The machine a run measured: figures are comparable only within one run on one machine.
#[derive(Serialize)]
pub struct Machine {
    pub kernel: String,
    pub nproc: usize,
    pub cpu_model: String,
    /// UTC, RFC 3339.
    pub date: String,
    /// Load average when the run started: the machine is shared, and this says how busy.
    pub loadavg: String,
}

impl Machine {
    pub fn here() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_default();
        let date = Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            date,
            loadavg: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// One target of the issue, checked against a figure of this run.
#[derive(Serialize)]
pub struct Target {
    pub what: String,
    /// The goal, as the issue states it (`≥ 5×`, `≤ 2 ms`).
    pub goal: String,
    /// What this run measured, with its unit.
    pub measured: String,
    pub met: bool,
}

/// One table of the report.
#[derive(Serialize)]
pub struct Section {
    pub id: &'static str,
    pub title: String,
    /// How the figures were taken, in a sentence or two.
    pub method: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
    pub targets: Vec<Target>,
    /// The raw figures, for whoever wants more than the table.
    pub data: Value,
}

impl Section {
    pub fn new(id: &'static str, title: impl Into<String>, method: impl Into<String>) -> Self {
        Self {
            id,
            title: title.into(),
            method: method.into(),
            columns: vec![],
            rows: vec![],
            notes: vec![],
            targets: vec![],
            data: Value::Null,
        }
    }

    pub fn columns(&mut self, cols: &[&str]) {
        self.columns = cols.iter().map(|c| c.to_string()).collect();
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    pub fn target(
        &mut self,
        what: impl Into<String>,
        goal: impl Into<String>,
        measured: impl Into<String>,
        met: bool,
    ) {
        self.targets.push(Target {
            what: what.into(),
            goal: goal.into(),
            measured: measured.into(),
            met,
        });
    }

    pub fn markdown_string(&self) -> String {
        let mut s = String::new();
        self.markdown(&mut s);
        s
    }

    fn markdown(&self, out: &mut String) {
        let _ = writeln!(out, "\n## {}\n\n{}\n", self.title, self.method);
        if !self.columns.is_empty() {
            let cols: Vec<String> = self.columns.iter().map(|c| cell(c)).collect();
            let _ = writeln!(out, "| {} |", cols.join(" | "));
            let _ = writeln!(out, "|{}", "---|".repeat(self.columns.len()));
            for r in &self.rows {
                let cells: Vec<String> = r.iter().map(|c| cell(c)).collect();
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub machine: Machine,
    pub smoke: bool,
    pub sections: Vec<Section>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "# drain bench results\n\n`cargo xtask bench{}` on {}, {} CPUs ({}), kernel {}, load \
             average {} at the start. The machine is shared: compare rows of one run, not runs.\n",
            if self.smoke { " --smoke" } else { "" },
            m.date,
            m.nproc,
            m.cpu_model,
            m.kernel,
            m.loadavg,
        );
        out.push_str(
            "\n## Targets\n\n| section | what | goal | measured | met |\n|---|---|---|---|---|\n",
        );
        for s in &self.sections {
            for t in &s.targets {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} |",
                    s.id,
                    cell(&t.what),
                    cell(&t.goal),
                    cell(&t.measured),
                    if t.met { "yes" } else { "**no**" }
                );
            }
        }
        for s in &self.sections {
            s.markdown(&mut out);
        }
        out
    }

    /// Writes `results.md` and `results.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        let mut json = serde_json::to_string_pretty(self)?;
        json.push('\n');
        std::fs::write(dir.join("results.json"), json)?;
        Ok(())
    }
}

/// A table cell: a `|` inside it (`ss | wc -l`) would end the cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// `x` with `digits` decimals.
pub fn f(x: f64, digits: usize) -> String {
    format!("{x:.digits$}")
}

/// Median of `v` (empty: NaN).
pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile of `v` by nearest rank (empty: NaN).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}
