//! The deploy tooling outside Rust, run by the README's test command so it cannot rot:
//! - the `drain.host` collection's smoke scenarios (`ansible/smoke/run.sh`): every state of
//!   the `gate` module with its assertions (changed, check mode, TTL renewal, waits, bad
//!   parameters) and the `rolling_deploy` role's success and failure paths (a rescue that
//!   ends in `fail`, the rollout stopping at the failed batch), in a namespace of its own;
//! - the collection's own tests (`ansible/test.sh`): `ansible-test units` (the module's plan,
//!   changed and error logic against recorded drain-user output) and `ansible-test
//!   integration` (the module against the real drain-user in a namespace the target makes);
//! - the systemd drop-in (`examples/systemd/verify.sh`): `systemd-analyze verify` of
//!   Debian's nginx.service with `drain.conf`, and the order and timeouts verify cannot see.
//!
//! Both scripts exit non-zero on any failed check; these tests only run them and show
//! their output.

use std::{path::PathBuf, process::Command};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn drain_user() -> PathBuf {
    drain_tests::drain_user_bin()
}

#[track_caller]
fn run_script(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn ansible_collection_smoke_scenarios_pass() {
    let venv = drain_tests::fleet::ansible_venv();
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("ansible/smoke/run.sh"))
        .arg(drain_user())
        .env("ANSIBLE_VENV", &venv);
    run_script(cmd, "ansible/smoke/run.sh");
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn ansible_collection_unit_and_integration_tests_pass() {
    let venv = drain_tests::fleet::ansible_venv();
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("ansible/test.sh"))
        .arg(drain_user())
        .env("ANSIBLE_VENV", &venv);
    run_script(cmd, "ansible/test.sh");
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn systemd_drop_in_verifies_clean() {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("examples/systemd/verify.sh"))
        .arg(drain_user());
    run_script(cmd, "examples/systemd/verify.sh");
}
