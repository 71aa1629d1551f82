//! `drain-user wait`: blocks until the ports drain; its exit code is its result
//! (`wait/report.rs` prints the outcome and the progress line).

use std::time::Duration;

use anyhow::Result;

use crate::{domain::Exit, output, wait};

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
    let exit = rt.block_on(wait::wait(wait::WaitArgs {
        ports,
        timeout,
        idle,
        format: wait::Format::pick(json),
    }))?;
    // The outcome is printed and flushed (every line is), and nothing is left to clean up:
    // exit now rather than take the runtime down first (its driver, timers and fds go
    // with the process). Errors still return to main, which prints them.
    std::process::exit(exit.code().into())
}
