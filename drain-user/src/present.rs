//! Presentation: the command line ([`cli`], the only module that knows clap), output that
//! ends quietly on EPIPE ([`output`]), the Prometheus exposition ([`metrics`]), and one file
//! per subcommand that maps its arguments onto the domain's types, calls the operation and
//! prints its result (text, JSON). [`crate::run`] only dispatches to these.

pub mod agent;
pub mod check;
pub mod cli;
pub mod gate;
pub mod metrics;
pub mod output;
pub mod status;
pub mod wait;
pub mod watch;
