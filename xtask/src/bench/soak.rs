//! The drift soak: churn many connections through a gated port and check that the kernel's
//! count comes back to exactly zero.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{
    report::{f, Section},
    sys::Ctx,
};
use drain_tests::{
    netns::NetNsPair,
    traffic::{churn, listen, ss_live, Op, Server, Stack},
};

/// Churns many connections through a gated port (the client allowlisted) and checks the
/// kernel's count comes back to exactly zero, equal to `ss`, with every passive open added
/// and removed once: the set semantics leave nothing to drift.
pub fn section(ctx: &Ctx) -> Result<Section> {
    const PORT: u16 = 8090;
    let n: u64 = std::env::var("DRAIN_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ctx.pick(200_000, 2_000));
    let bin = ctx.bin.as_path();
    let pair = NetNsPair::new();
    // RST endings and server-first closes leave no TIME_WAIT on the client: its ports last.
    let _ = pair
        .cmd(&pair.b, "sysctl")
        .args(["-qw", "net.ipv4.ip_local_port_range=1024 65000"])
        .output();
    let server = Server::start(listen(&pair.a, Stack::V4, PORT), 4);
    let bin_s = bin.to_str().unwrap();
    let out = pair
        .cmd(&pair.a, bin_s)
        .args(["gate", "on", "--port", &PORT.to_string(), "--ttl", "1h"])
        .args(["--allow", &format!("{}/32", pair.b_v4)])
        .output()?;
    if !out.status.success() {
        bail!("gate on failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let target = SocketAddr::new(pair.a_v4.into(), PORT);
    let endings = [Op::ServerClose, Op::ServerReset, Op::ClientReset];
    let t0 = Instant::now();
    let done = churn(&pair.b, &[target], &endings, n, 4);
    let elapsed = t0.elapsed();
    server.wait_finished(done.connections, Duration::from_secs(60));
    thread::sleep(Duration::from_millis(200));
    let st: serde_json::Value = serde_json::from_slice(
        &pair
            .cmd(&pair.a, bin_s)
            .args(["status", "--json"])
            .output()?
            .stdout,
    )?;
    let live = st["ports"][0]["live_connections"].as_i64();
    let t = &st["tracker"];
    let (ss_est, ss_cw) = ss_live(&pair.a, PORT);
    let _ = pair.cmd(&pair.a, bin_s).args(["gate", "off"]).output();
    let lost = t["insert_failed"].as_u64().unwrap_or(0) + t["read_failed"].as_u64().unwrap_or(0);
    if live != Some(0)
        || ss_est + ss_cw != 0
        || t["added"] != t["removed"]
        || t["added"].as_u64() != Some(done.connections)
    {
        bail!("the live count drifted: {st}");
    }
    let mut s = Section::new(
        "soak",
        "Drift soak",
        format!(
            "{n} connections churned through a gated port (client allowlisted; server FIN, \
             server RST and client RST endings, 4 client threads), then the kernel's count \
             read back (`DRAIN_SOAK=N` sets the number)."
        ),
    );
    s.columns(&[
        "connections",
        "seconds",
        "per second",
        "live_connections after",
        "ss after",
        "tracker added / removed / lost",
    ]);
    s.row(vec![
        done.connections.to_string(),
        f(elapsed.as_secs_f64(), 1),
        f(done.connections as f64 / elapsed.as_secs_f64(), 0),
        format!("{live:?}"),
        (ss_est + ss_cw).to_string(),
        format!("{} / {} / {lost}", t["added"], t["removed"]),
    ]);
    s.target(
        format!(
            "count back to exactly 0 after {} connections",
            done.connections
        ),
        "0, added = removed = connections",
        format!("{live:?}; added {} removed {}", t["added"], t["removed"]),
        true,
    );
    s.data = serde_json::json!({"connections": done.connections, "seconds": elapsed.as_secs_f64(), "status": st});
    Ok(s)
}
