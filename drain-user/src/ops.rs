//! Operations, one per subcommand (and what they share): each takes the domain's types,
//! works through [`crate::kernel`] and returns what happened for [`crate::present`] to print.

pub mod agent;
pub mod check;
pub mod follow;
pub mod gate;
pub mod plan;
pub mod status;
pub mod wait;
pub mod watch;
