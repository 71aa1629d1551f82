//! Presentation, one file per subcommand: each maps its command-line arguments onto the
//! domain's types, calls the operation and prints its result (text, JSON, Prometheus).
//! [`crate::run`] only dispatches to these.

pub mod agent;
pub mod check;
pub mod gate;
pub mod status;
pub mod wait;
pub mod watch;
