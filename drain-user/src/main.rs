//! The `drain-user` binary: parse the command line, run it, print any error as one line,
//! exit with its code. Everything else lives in the library (see its module map).

use std::{io::Write, process::ExitCode};

use clap::Parser;
use drain_user::{
    cli::{self, Cli},
    domain::{Exit, UsageError},
    output,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match cli::usage_line(&e) {
            // --help, --version, a bare `drain-user`: clap's own output and exit code.
            Ok(()) => e.exit(),
            Err(line) => {
                let _ = writeln!(std::io::stderr(), "{line}");
                return Exit::Usage.into();
            }
        },
    };
    let exit = match drain_user::run(cli) {
        Ok(exit) => exit,
        Err(e) if output::is_closed(&e) => Exit::Success,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "drain-user: error: {e:#}");
            if e.chain().any(|c| c.is::<UsageError>()) {
                Exit::Usage
            } else {
                Exit::Failure
            }
        }
    };
    exit.into()
}
