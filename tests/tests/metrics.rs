//! `status --format prometheus` and `--textfile`, read by a real Prometheus text-format
//! parser (prometheus_client's, from PyPI, in a venv under target/) and checked value by
//! value against `status --json` taken right after, in a quiescent state.

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use drain_tests::{
    cli::{port_status, Drain, Json, JsonExt},
    netns::NetNsPair,
    traffic::{connect, probe_all, round_trip, EchoServer},
};

const PROMETHEUS_CLIENT: &str = "prometheus-client==0.26.0";

/// The venv's python, made once per test process.
fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/prom-venv");
        let py = venv.join("bin/python");
        let have = Command::new(&py)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "python3 -m venv {} failed", venv.display());
            let ok = Command::new(&py)
                .args(["-m", "pip", "install", "-q", PROMETHEUS_CLIENT])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "pip install {PROMETHEUS_CLIENT} failed");
        }
        py
    })
    .clone()
}

/// Parses exposition text with prometheus_client: {family name: (type, help, [(sample
/// name, labels, value)])}.
type Families = BTreeMap<String, (String, String, Vec<(String, BTreeMap<String, String>, f64)>)>;

fn parse(text: &str) -> Families {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = [f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
print(json.dumps(out))
"#;
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the parser");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

/// The one sample of `family` with `labels`.
#[track_caller]
fn sample(f: &Families, family: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, _, samples) = f
        .get(family)
        .unwrap_or_else(|| panic!("no family {family}: {f:?}"));
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let hits: Vec<_> = samples.iter().filter(|(_, l, _)| *l == want).collect();
    assert_eq!(hits.len(), 1, "{family}{want:?}: {samples:?}");
    hits[0].2
}

/// Every value of the exposition equals the one in `status --json`.
#[track_caller]
fn assert_matches(f: &Families, st: &Json) {
    assert_eq!(
        sample(f, "drain_gate_on", &[]),
        f64::from(u8::from(st["gate"] == "on"))
    );
    assert_eq!(
        sample(f, "drain_gate_expired", &[]),
        f64::from(u8::from(st["expired"] == true))
    );
    assert_eq!(
        sample(f, "drain_gate_info", &[("policy", st["policy"].str())]),
        1.0
    );
    for (family, kind) in [
        ("drain_gate_on", "gauge"),
        ("drain_port_live_connections", "gauge"),
        ("drain_port_syns_refused", "counter"),
        ("drain_tracker_added", "counter"),
    ] {
        assert_eq!(f[family].0, kind, "{family}");
        assert!(!f[family].1.is_empty(), "{family} has HELP");
    }
    for p in st["ports"].arr() {
        let port = p["port"].u64().to_string();
        let l = [("port", port.as_str())];
        assert_eq!(
            sample(f, "drain_port_live_connections", &l),
            p["live_connections"].i64() as f64
        );
        for key in drain_common::PortStats::COUNTERS.iter().map(|c| c.key) {
            // prometheus_client names a counter family without its _total suffix.
            assert_eq!(
                sample(f, &format!("drain_port_{key}"), &l),
                p[key].u64() as f64,
                "{key} of port {port}"
            );
        }
    }
    for key in ["added", "removed", "insert_failed", "read_failed"] {
        assert_eq!(
            sample(f, &format!("drain_tracker_{key}"), &[]),
            st["tracker"][key].u64() as f64,
            "tracker {key}"
        );
    }
    for i in st["interfaces"].arr() {
        let l = [
            ("interface", i["name"].str()),
            ("attach", i["attach"].str()),
            ("mode", i["mode"].as_str().unwrap_or("")),
            ("tc_mode", i["tc_mode"].as_str().unwrap_or("")),
        ];
        assert_eq!(sample(f, "drain_interface_attached", &l), 1.0);
    }
}

/// `--attach tc`: the interface's sample carries the TC mode `status --json` reports,
/// `tcx` (a TCX link) or `clsact` (drain's filter on the clsact qdisc, forced here with
/// DRAIN_NO_TCX as on a kernel without TCX), and an XDP attachment's label is empty.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn prometheus_metrics_name_the_tc_mode() {
    let pair = NetNsPair::new();
    let tcx = Drain::new(&pair, &pair.a);
    let classic = Drain::classic(&pair, &pair.a);
    let mut runs = vec![(&classic, "tc", "clsact")];
    if drain_tests::kernel::has(drain_tests::kernel::Feature::Tcx) {
        runs.push((&tcx, "tc", "tcx"));
    }
    runs.push((&tcx, "xdp", ""));
    for (drain, attach, tc_mode) in runs {
        drain.on(&[
            "--port",
            "8080",
            "--iface",
            &pair.veth_a,
            "--attach",
            attach,
        ]);
        let st = drain.status();
        assert_eq!(
            st["interfaces"][0]["tc_mode"].as_str().unwrap_or(""),
            tc_mode,
            "{st}"
        );
        let f = parse(
            &drain
                .run(&["status", "--format", "prometheus"])
                .expect_ok()
                .stdout,
        );
        assert_matches(&f, &st);
        let mode = if attach == "xdp" {
            st["interfaces"][0]["mode"].str()
        } else {
            ""
        };
        let l = [
            ("interface", pair.veth_a.as_str()),
            ("attach", attach),
            ("mode", mode),
            ("tc_mode", tc_mode),
        ];
        assert_eq!(sample(&f, "drain_interface_attached", &l), 1.0, "{f:?}");
        drain.off();
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn prometheus_metrics_parse_and_equal_status_json() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let (p, q) = (8080u16, 9090u16);
    let server = EchoServer::start(&pair, &pair.a, SocketAddr::new(pair.a_v4.into(), p));

    // No gate: gate off, no port or tracker families.
    let f = parse(
        &drain
            .run(&["status", "--format", "prometheus"])
            .expect_ok()
            .stdout,
    );
    assert_eq!(sample(&f, "drain_gate_on", &[]), 0.0);
    assert!(!f.contains_key("drain_port_live_connections"), "{f:?}");

    let held = connect(&pair, &pair.b, server.addr, Duration::from_secs(5)).stream("held");
    round_trip(&held, 10, 1);
    drain.on(&["--port", &format!("{p},{q}"), "--ttl", "10m"]);
    let refused = probe_all(&pair, &pair.b, &[server.addr; 3], Duration::from_secs(1));
    assert!(refused.iter().all(|c| c.is_timed_out()), "{refused:?}");
    // Quiescent: wait until the dropped SYNs' retransmits have stopped counting.
    std::thread::sleep(Duration::from_millis(300));

    let text = drain
        .run(&["status", "--format", "prometheus"])
        .expect_ok()
        .stdout
        .clone();
    let st = drain.status();
    let f = parse(&text);
    assert_matches(&f, &st);
    assert_eq!(sample(&f, "drain_gate_on", &[]), 1.0);
    assert_eq!(
        sample(&f, "drain_port_live_connections", &[("port", "8080")]),
        1.0
    );
    assert!(sample(&f, "drain_port_syns_refused", &[("port", "8080")]) >= 3.0);
    let ttl = sample(&f, "drain_gate_ttl_remaining_seconds", &[]);
    let ttl_json = st["ttl_remaining_ms"].u64() as f64 / 1000.0;
    assert!(
        ttl > 590.0 && ttl <= 600.0 && ttl >= ttl_json,
        "{ttl} vs {ttl_json}"
    );
    // Base units and naming: seconds, _total on every counter sample.
    for (name, (kind, _, samples)) in &f {
        assert!(name.starts_with("drain_"), "{name}");
        if kind == "counter" {
            assert!(
                samples.iter().all(|s| s.0 == format!("{name}_total")),
                "{name}: {samples:?}"
            );
        }
    }
    // --json is --format json.
    let a: Json = serde_json::from_str(
        &drain
            .run(&["status", "--format", "json"])
            .expect_ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(a["ports"], st["ports"]);

    // --textfile: the same metrics in a file, nothing on stdout, no temporary file left.
    let dir = tempdir();
    let path = dir.join("drain.prom");
    let out = drain.run(&["status", "--textfile", path.to_str().unwrap()]);
    out.expect_ok();
    assert!(out.stdout.is_empty(), "{out}");
    let st = drain.status();
    assert_matches(&parse(&std::fs::read_to_string(&path).unwrap()), &st);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, ["drain.prom"], "only the target file is left");
    assert_eq!(port_status(&st, p).unwrap()["live_connections"], 1);
    drain
        .run(&["status", "--textfile", "/nonexistent-dir/drain.prom"])
        .expect_code(1);
    drain
        .run(&["status", "--json", "--format", "text"])
        .expect_code(2);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("drain-textfile-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
