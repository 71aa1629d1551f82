//! `drain-user wait`: blocks until the ports drain; its exit code is its result. What it
//! saw is printed here: JSON events on stdout (`--json`), or text (progress on stderr, the
//! result on stdout), with a progress line instead of progress lines on a terminal.

use std::{collections::BTreeSet, io::IsTerminal, time::Duration};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::{
    agent::{Closed, Settled},
    domain::Exit,
    errln, outln, output,
    wait::{self, Leftover, Outcome, Progress, Reporter},
};

pub fn run(
    ports: Vec<u16>,
    timeout: Option<Duration>,
    idle: Option<Duration>,
    json: bool,
) -> Result<Exit> {
    // Its exit code is its result: a reader that goes away does not end it.
    output::keep_going_when_closed();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut report = Report::new(json);
    let exit = rt.block_on(wait::wait(
        wait::WaitArgs {
            ports,
            timeout,
            idle,
        },
        &mut report,
    ))?;
    // The outcome is printed and flushed (every line is), and nothing is left to clean up:
    // exit now rather than take the runtime down first (its driver, timers and fds go
    // with the process). Errors still return to main, which prints them.
    std::process::exit(exit.code().into())
}

/// How `wait` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// One JSON object per event on stdout.
    Json,
    /// Text: progress lines on stderr, the result on stdout.
    Plain,
    /// Text, with a progress line on the terminal instead of progress lines.
    Terminal,
}

/// The reporter `wait` is given: the format is picked at once, the renderer once the
/// ports are known.
struct Report {
    format: Format,
    render: Option<Box<dyn Render>>,
}

impl Report {
    /// `--json`, else a progress line when stderr is a terminal, else plain text.
    fn new(json: bool) -> Self {
        let format = if json {
            Format::Json
        } else if std::io::stderr().is_terminal() {
            Format::Terminal
        } else {
            Format::Plain
        };
        Report {
            format,
            render: None,
        }
    }
}

impl Reporter for Report {
    fn start(&mut self, ports: &BTreeSet<u16>) {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        let plain = Plain {
            ports: list.join(","),
        };
        self.render = Some(match self.format {
            Format::Json => Box::new(Json),
            Format::Plain => Box::new(plain),
            Format::Terminal => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg}").expect("valid template"),
                );
                bar.enable_steady_tick(Duration::from_millis(120));
                Box::new(Terminal { bar, plain })
            }
        });
    }

    fn closed(&mut self, s: &Settled) -> Result<()> {
        match self.format {
            Format::Json => outln!(
                "{}",
                serde_json::to_string(&ClosedEvent {
                    elapsed_ms: s.elapsed.as_millis() as u64,
                    event: "closed",
                    reason: s.reason,
                    syns_during_announce: s.syns,
                })?
            ),
            Format::Plain | Format::Terminal => match s.reason {
                Closed::Quiet => errln!(
                    "drain: the balancer went quiet (no new connection for {}): gate closed after {:.2}s",
                    humantime::format_duration(s.quiet),
                    s.elapsed.as_secs_f64()
                ),
                Closed::Delay => errln!(
                    "drain: the announcement's delay ran out: gate closed after {:.2}s ({} new connection(s) meanwhile)",
                    s.elapsed.as_secs_f64(),
                    s.syns
                ),
            },
        }
    }

    fn progress(&mut self, p: &Progress, changed: bool) -> Result<()> {
        match &mut self.render {
            Some(r) => r.progress(p, changed),
            None => Ok(()),
        }
    }

    fn finish(&mut self, outcome: &Outcome) -> Result<()> {
        match &mut self.render {
            Some(r) => r.finish(outcome),
            None => Ok(()),
        }
    }
}

/// One way of printing the counts and the outcome.
trait Render {
    fn progress(&mut self, p: &Progress, changed: bool) -> Result<()>;
    fn finish(&mut self, outcome: &Outcome) -> Result<()>;
}

/// The `closed` event of an announced gate.
#[derive(Serialize)]
struct ClosedEvent {
    elapsed_ms: u64,
    event: &'static str,
    reason: Closed,
    syns_during_announce: u64,
}

#[derive(Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum EventKind {
    Progress,
    Drained,
    Idle,
    Timeout,
}

/// One `--json` line. Keys in alphabetical order, as `wait --json` has always printed them.
#[derive(Serialize)]
struct Event<'a> {
    elapsed_ms: u64,
    event: EventKind,
    live: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<PortLive>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<&'a [Leftover]>,
}

#[derive(Serialize)]
struct PortLive {
    live_connections: i64,
    port: u16,
}

struct Json;

impl Json {
    fn print(e: &Event) -> Result<()> {
        outln!("{}", serde_json::to_string(e)?)
    }
}

impl Render for Json {
    fn progress(&mut self, p: &Progress, changed: bool) -> Result<()> {
        if !changed {
            return Ok(());
        }
        Json::print(&Event {
            elapsed_ms: p.elapsed.as_millis() as u64,
            event: EventKind::Progress,
            live: p.live,
            ports: Some(
                p.ports
                    .iter()
                    .map(|&(port, live_connections)| PortLive {
                        live_connections,
                        port,
                    })
                    .collect(),
            ),
            remaining: None,
        })
    }

    fn finish(&mut self, outcome: &Outcome) -> Result<()> {
        let (event, elapsed, live, remaining) = match outcome {
            Outcome::Drained { elapsed } => (EventKind::Drained, elapsed, 0, None),
            Outcome::Idle { elapsed, live } => (EventKind::Idle, elapsed, *live, None),
            Outcome::Timeout {
                elapsed,
                live,
                left,
            } => (EventKind::Timeout, elapsed, *live, Some(&left[..])),
            Outcome::Interrupted | Outcome::Terminated => return Ok(()),
        };
        Json::print(&Event {
            elapsed_ms: elapsed.as_millis() as u64,
            event,
            live,
            ports: None,
            remaining,
        })
    }
}

struct Plain {
    /// "80,443"
    ports: String,
}

impl Render for Plain {
    fn progress(&mut self, p: &Progress, changed: bool) -> Result<()> {
        if changed {
            errln!(
                "drain: {} live connection(s) on port {}",
                p.live,
                self.ports
            )?;
        }
        Ok(())
    }

    fn finish(&mut self, outcome: &Outcome) -> Result<()> {
        let ports = &self.ports;
        match outcome {
            Outcome::Drained { elapsed } => outln!(
                "drained: no live connections on port {ports} (after {:.2}s)",
                elapsed.as_secs_f64()
            ),
            Outcome::Idle { elapsed, live } => outln!(
                "idle: {live} connection(s) still open on port {ports}, none with data in flight or recent traffic (after {:.2}s); a graceful server stop can close them now",
                elapsed.as_secs_f64()
            ),
            Outcome::Timeout {
                elapsed,
                live,
                left,
            } => {
                errln!(
                    "drain: timed out after {:.1}s with {live} live connection(s) on port {ports}:",
                    elapsed.as_secs_f64()
                )?;
                for l in left {
                    let quiet = l
                        .idle_ms
                        .map_or("?".into(), |ms| format!("{:.1}s", f64::from(ms) / 1000.0));
                    errln!(
                        "  {} -> :{} {} (unread {} B, unsent {} B, quiet {quiet})",
                        l.peer,
                        l.port,
                        l.state,
                        l.unread_bytes,
                        l.unsent_bytes
                    )?;
                }
                Ok(())
            }
            Outcome::Interrupted | Outcome::Terminated => Ok(()),
        }
    }
}

/// A spinner line on stderr, redrawn on every poll; the result as [`Plain`] prints it.
struct Terminal {
    bar: ProgressBar,
    plain: Plain,
}

impl Render for Terminal {
    fn progress(&mut self, p: &Progress, _changed: bool) -> Result<()> {
        let left = p.timeout_in.map_or(String::new(), |t| {
            format!(", timeout in {:.1}s", t.as_secs_f64())
        });
        self.bar.set_message(format!(
            "{} live connection(s) on port {}, {:.1}s elapsed{left}",
            p.live,
            self.plain.ports,
            p.elapsed.as_secs_f64()
        ));
        Ok(())
    }

    fn finish(&mut self, outcome: &Outcome) -> Result<()> {
        if matches!(outcome, Outcome::Interrupted | Outcome::Terminated) {
            return Ok(());
        }
        self.bar.finish_and_clear();
        self.plain.finish(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_events_keep_their_shape() {
        let e = Event {
            elapsed_ms: 12,
            event: EventKind::Progress,
            live: 3,
            ports: Some(vec![PortLive {
                live_connections: 3,
                port: 80,
            }]),
            remaining: None,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"elapsed_ms":12,"event":"progress","live":3,"ports":[{"live_connections":3,"port":80}]}"#
        );
        let left = [Leftover {
            idle_ms: Some(1500),
            peer: "198.18.0.2:40000".into(),
            port: 80,
            state: "ESTABLISHED",
            unread_bytes: 0,
            unsent_bytes: 7,
        }];
        let e = Event {
            elapsed_ms: 500,
            event: EventKind::Timeout,
            live: 1,
            ports: None,
            remaining: Some(&left),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            concat!(
                r#"{"elapsed_ms":500,"event":"timeout","live":1,"remaining":[{"idle_ms":1500,"#,
                r#""peer":"198.18.0.2:40000","port":80,"state":"ESTABLISHED","unread_bytes":0,"unsent_bytes":7}]}"#
            )
        );
    }
}
