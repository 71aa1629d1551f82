//! `drain-user watch`: the live view (it prints each event itself, as it comes).

use std::time::Duration;

use anyhow::Result;

use crate::{domain::Exit, watch};

pub fn run(json: bool, rate: u32, duration: Option<Duration>) -> Result<Exit> {
    watch::watch(&watch::WatchArgs {
        json,
        rate,
        duration,
    })?;
    Ok(Exit::Success)
}
