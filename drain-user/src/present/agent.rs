//! `drain-user agent`: the balancer's agent-check / HTTP endpoint.

use anyhow::Result;

use crate::{agent, cli::AgentArgs, domain::Exit};

pub fn run(args: &AgentArgs) -> Result<Exit> {
    agent::serve(&agent::Options {
        weight: args.weight,
        greeting: args.greeting,
    })
}
