//! Established traffic: one TCP stream over the veth pair, the gate attached and on against
//! no program (section 3); also the stream that must keep flowing during a SYN flood.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use drain_tests::{netns::NetNsPair, traffic::bind};
use serde_json::json;

use super::{
    report::{f, median, Section},
    sys::{sh, Ctx},
};

/// The port the stream runs on (never gated).
pub const STREAM_PORT: u16 = 5201;

/// A TCP stream from namespace `b` to a sink in `a`, running until dropped.
pub struct Stream {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// What a stream carried over a window.
pub struct Carried {
    /// Bytes per second over the window.
    pub rate: f64,
    /// Fewest bytes per second seen in any 100 ms slot of the window.
    pub min_slot_rate: f64,
}

impl Stream {
    pub fn start(pair: &NetNsPair) -> Result<Self> {
        let addr = SocketAddr::new(pair.a_v4.into(), STREAM_PORT);
        let listener = bind(pair, &pair.a, addr);
        let client = pair
            .in_ns(&pair.b, || TcpStream::connect(addr))
            .context("connecting the stream")?;
        let (mut server, _) = listener.accept()?;
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (received, stop) = (received.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
            })
        };
        let writer = {
            let stop = stop.clone();
            let mut client = client;
            thread::spawn(move || {
                let buf = vec![0x5au8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if client.write_all(&buf).is_err() {
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            })
        };
        Ok(Self {
            received,
            stop,
            threads: vec![reader, writer],
        })
    }

    /// Watches the stream for `window`, sampling every 100 ms.
    pub fn measure(&self, window: Duration) -> Carried {
        let slot = Duration::from_millis(100);
        let t0 = Instant::now();
        let c0 = self.received.load(Ordering::Relaxed);
        let (mut last_t, mut last_c) = (t0, c0);
        let mut min_slot = f64::INFINITY;
        while t0.elapsed() < window {
            thread::sleep(slot.min(window.saturating_sub(t0.elapsed())));
            let (t, c) = (Instant::now(), self.received.load(Ordering::Relaxed));
            let dt = (t - last_t).as_secs_f64();
            if dt > 0.05 {
                min_slot = min_slot.min((c - last_c) as f64 / dt);
                (last_t, last_c) = (t, c);
            }
        }
        let c1 = self.received.load(Ordering::Relaxed);
        Carried {
            rate: (c1 - c0) as f64 / t0.elapsed().as_secs_f64(),
            min_slot_rate: if min_slot.is_finite() { min_slot } else { 0.0 },
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A namespace pair where each new TCP connection starts afresh: by default the kernel
/// caches the last connection's ssthresh per destination (tcp_metrics), so a stream would
/// start where the previous configuration's left off.
pub fn stream_pair() -> Result<NetNsPair> {
    let pair = NetNsPair::new();
    for ns in [&pair.a, &pair.b] {
        sh(ns, "sysctl -qw net.ipv4.tcp_no_metrics_save=1")?;
    }
    Ok(pair)
}

/// Section 3: stream throughput with the gate attached and on, against no program, in
/// interleaved rounds on one veth pair.
pub fn section(ctx: &Ctx) -> Result<Section> {
    let rounds = ctx.pick(5, 1);
    let window = ctx.pick(Duration::from_millis(1500), Duration::from_millis(200));
    let mut s = Section::new(
        "stream",
        "3. Established stream throughput through the gate",
        format!(
            "One TCP stream (64 KiB writes) from the peer namespace to a sink in the gated one \
             over a veth pair, {rounds} interleaved rounds of {:.1} s, median. The gate is on \
             for another port (8080): the stream's packets are established traffic it parses \
             and passes. Each round starts with the next configuration; no TCP metrics are \
             carried from one connection to the next (tcp_no_metrics_save).",
            window.as_secs_f64()
        ),
    );
    let pair = stream_pair()?;
    // The default first among drain's: no --attach, what `gate on` does unless told.
    let configs: [(&str, &[&str]); 6] = [
        ("no program", &[]),
        ("no program, peer TSO off", &[]),
        ("drain default (auto), policy drop", &["--policy", "drop"]),
        (
            "drain XDP, policy drop",
            &["--attach", "xdp", "--policy", "drop"],
        ),
        (
            "drain XDP, policy reset",
            &["--attach", "xdp", "--policy", "reset"],
        ),
        (
            "drain TC, policy drop",
            &["--attach", "tc", "--policy", "drop"],
        ),
    ];
    let mut rates = vec![Vec::new(); configs.len()];
    // What the default attached the veth with, as `status` says (hook, TC mode, reason).
    let mut chosen: Option<String> = None;
    for round in 0..rounds {
        // Each round starts one configuration later, so none always follows the same one.
        for k in 0..configs.len() {
            let i = (round + k) % configs.len();
            let (name, args) = &configs[i];
            let tso_off = name.ends_with("TSO off");
            if tso_off {
                sh(&pair.b, &format!("ethtool -K {} tso off", pair.veth_b))?;
            }
            let gate = if args.is_empty() {
                None
            } else {
                let mut a = vec!["--port", "8080", "--iface", &pair.veth_a, "--ttl", "10m"];
                a.extend_from_slice(args);
                Some(ctx.gate_on(&pair.a, &a)?)
            };
            if chosen.is_none() && !args.contains(&"--attach") && gate.is_some() {
                chosen = Some(attached_as(ctx, &pair)?);
            }
            let stream = Stream::start(&pair)?;
            thread::sleep(Duration::from_millis(100));
            rates[i].push(stream.measure(window).rate);
            drop(stream);
            if let Some(g) = gate {
                g.off()?;
            }
            if tso_off {
                sh(&pair.b, &format!("ethtool -K {} tso on", pair.veth_b))?;
            }
        }
    }
    let base = median(&rates[0]);
    s.columns(&[
        "configuration",
        "Gbit/s (median)",
        "vs no program",
        "rounds (Gbit/s)",
    ]);
    let mut data = Vec::new();
    for (i, (name, _)) in configs.iter().enumerate() {
        let m = median(&rates[i]);
        let gbit = |r: f64| r * 8.0 / 1e9;
        s.row(vec![
            name.to_string(),
            f(gbit(m), 2),
            format!("{}×", f(m / base, 3)),
            rates[i]
                .iter()
                .map(|r| f(gbit(*r), 2))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
        data.push(json!({"config": name, "bytes_per_s": rates[i], "median": m, "ratio": m / base}));
    }
    s.data = json!(data);
    s.note(
        "Native XDP on a veth end turns off TSO on its peer (`veth_xdp_set`), so the sender \
         segments every 64 KiB write into 1500-byte packets in software: the row \"peer TSO \
         off\" is the same loss with no program at all. A NIC's driver has no such coupling.",
    );
    if let Some(c) = &chosen {
        s.note(format!(
            "The default (`--attach auto`) attached the veth as `drain-user status` reports it: \
             {c}. XDP on a veth is `--attach xdp` only."
        ));
    }
    for (i, (name, args)) in configs.iter().enumerate().skip(2) {
        let r = median(&rates[i]) / base;
        let what = if args.contains(&"--attach") {
            format!("stream with {name} (--attach), vs no program")
        } else {
            format!("stream with {name}, vs no program")
        };
        s.target(what, "≥ 0.97×", format!("{}×", f(r, 3)), r >= 0.97);
    }
    Ok(s)
}

/// "tc tcx (virtual device (veth): ...)": how the gate in `pair.a` holds the veth, from
/// `status --json`.
fn attached_as(ctx: &Ctx, pair: &NetNsPair) -> Result<String> {
    let out = ctx
        .drain(&pair.a)?
        .args(["status", "--json"])
        .output()
        .context("drain-user status --json")?;
    let st: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("status --json is not JSON")?;
    let i = st["interfaces"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == pair.veth_a.as_str()))
        .with_context(|| format!("status does not list {}: {st}", pair.veth_a))?;
    let s = |k: &str| i[k].as_str().unwrap_or("").to_string();
    let mode = match s("attach").as_str() {
        "tc" => s("tc_mode"),
        _ => s("mode"),
    };
    Ok(format!("{} {mode} ({})", s("attach"), s("reason")))
}
