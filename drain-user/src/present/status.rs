//! `drain-user status`: the gate's state as text, JSON or Prometheus, or a textfile for
//! node_exporter.

use std::path::Path;

use anyhow::Result;

use crate::{cli::StatusFormat, domain::Exit, metrics, outln, output, status};

pub fn run(json: bool, format: Option<StatusFormat>, textfile: Option<&Path>) -> Result<Exit> {
    let st = status::collect()?;
    if let Some(path) = textfile {
        metrics::write_textfile(path, &metrics::prometheus(&st)?)?;
        return Ok(Exit::Success);
    }
    let format = match (json, format) {
        (true, _) => StatusFormat::Json,
        (false, f) => f.unwrap_or(StatusFormat::Text),
    };
    match format {
        StatusFormat::Json => outln!("{}", serde_json::to_string(&st)?)?,
        StatusFormat::Prometheus => {
            let text = metrics::prometheus(&st)?;
            output::out(format_args!("{}", text.trim_end_matches('\n')))?;
        }
        StatusFormat::Text => {
            let text = status::human(&st);
            output::out(format_args!("{}", text.trim_end_matches('\n')))?;
        }
    }
    Ok(Exit::Success)
}
