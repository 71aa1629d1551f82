//! `gate on --dry-run` and `gate off --dry-run`: the plan lists exactly the settings that
//! differ between the gate asked for and the kernel's, and changes nothing: the state
//! directory's pins, the interfaces' attachments (`ip -d link`, `bpftool net`), the gate's
//! config map (its deadline included: a dry run renews no TTL) and `status` are the same
//! before and after. Bad input is the same one line and exit 2 as without `--dry-run`.

use aya::maps::{Array, Map};
use drain_common::{map, GateConfig};
use drain_tests::{
    cli::{Drain, Json},
    netns::NetNsPair,
    object::bpftool,
    require_root,
};

const P: u16 = 8460;

/// Everything a dry run must leave alone, as comparable text.
#[derive(Debug, PartialEq)]
struct Snapshot {
    pins: Vec<String>,
    links: String,
    bpftool_net: Option<String>,
    config: Option<[u64; 8]>,
    status: Json,
}

fn snapshot(gate: &Drain) -> Snapshot {
    let config = (!gate.pins().is_empty()).then(|| {
        let m: Array<_, GateConfig> = Array::try_from(Map::Array(gate.map(map::CONFIG))).unwrap();
        let c = m.get(&0, 0).unwrap();
        [
            u64::from(c.enabled),
            u64::from(c.policy),
            c.deadline_ns,
            c.ttl_ns,
            c.rst_interval_ns,
            u64::from(c.flags),
            c.announce_ns,
            c.quiet_ns,
        ]
    });
    let mut status = gate.status();
    // The only field that moves by itself.
    status["ttl_remaining_ms"] = Json::Null;
    Snapshot {
        pins: gate.pins(),
        links: gate.sh("ip", &["-d", "link", "show"]),
        bpftool_net: bpftool(gate.pair, &gate.ns, &["net", "show"]),
        config,
        status,
    }
}

/// `gate <args> --dry-run --json`: exit 0, the plan, and nothing changed.
#[track_caller]
fn plan(gate: &Drain, args: &[&str]) -> Json {
    let before = snapshot(gate);
    let mut all = vec!["gate"];
    all.extend_from_slice(args);
    all.extend(["--dry-run", "--json"]);
    let out = gate.run(&all);
    out.expect_ok();
    let p: Json = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("the plan is not JSON ({e}): {out}"));
    assert_eq!(snapshot(gate), before, "a dry run changed the host: {out}");
    // Its text form says the same and changes nothing either.
    all.pop();
    let text = gate.run(&all);
    text.expect_ok();
    assert_eq!(
        text.stdout.contains("would change"),
        p["changed"] == true,
        "{text}"
    );
    assert_eq!(snapshot(gate), before, "a dry run changed the host: {text}");
    p
}

/// The differences as (field, before, after), in the plan's order.
fn diffs(p: &Json) -> Vec<(String, Json, Json)> {
    p["differences"]
        .as_array()
        .expect("differences is an array")
        .iter()
        .map(|d| {
            (
                d["field"].as_str().expect("field").to_owned(),
                d["before"].clone(),
                d["after"].clone(),
            )
        })
        .collect()
}

fn sv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn d(field: &str, before: Json, after: Json) -> (String, Json, Json) {
    (field.to_owned(), before, after)
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn dry_run_lists_every_difference_and_changes_nothing() {
    require_root();
    let pair = NetNsPair::new();
    let gate = Drain::new(&pair, &pair.a);
    let veth = pair.veth_a.as_str();
    let port = P.to_string();
    // The default, auto, on the veth and lo: TC, and why.
    let on_veth = serde_json::json!({
        "name": veth, "attach": "tc",
        "reason": "auto: virtual device (veth): TC keeps the peer's TSO",
    });
    // `gate on` for P on the veth, with a TTL of 2m unless `extra` gives one.
    let on = |extra: &[&str]| {
        let mut args = vec!["on", "--port", &port, "--iface", veth];
        if !extra.contains(&"--ttl") {
            args.extend(["--ttl", "2m"]);
        }
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };

    // No gate: everything it would set.
    let a = on(&[]);
    let p = plan(&gate, &sv(&a));
    assert_eq!(p["action"], "on");
    assert_eq!(p["changed"], true, "{p}");
    assert_eq!(p["ttl_renewed"], false, "{p}");
    assert_eq!(
        diffs(&p),
        [
            d("gate", "none".into(), "on".into()),
            d("ports", serde_json::json!([]), serde_json::json!([P])),
            d("policy", Json::Null, "drop".into()),
            d(
                "interfaces",
                serde_json::json!([]),
                serde_json::json!([on_veth])
            ),
            d("ttl_ms", Json::Null, 120_000.into()),
            d("rst_rate", Json::Null, 1000.into()),
        ],
        "{p}"
    );
    assert!(gate.pins().is_empty(), "a dry run made the state directory");
    let p = plan(&gate, &["off"]);
    assert_eq!((&p["changed"], diffs(&p).len()), (&false.into(), 0), "{p}");

    // The same gate for real; the same request again is no change, only a renewal.
    gate.on(&sv(&a)[1..]);
    let p = plan(&gate, &sv(&a));
    assert_eq!(p["changed"], false, "{p}");
    assert_eq!(p["ttl_renewed"], true, "{p}");
    assert_eq!(diffs(&p), [], "{p}");
    assert_eq!(p["status"]["gate"], "on", "{p}");
    // status reports the settings, not only the time left.
    let st = gate.status();
    assert_eq!(
        (&st["ttl_ms"], &st["rst_rate"]),
        (&120_000.into(), &1000.into()),
        "{st}"
    );

    // Every setting changed at once: each listed with the kernel's value and the new one.
    let b = on(&[
        "--port",
        "8461",
        "--iface",
        "lo",
        "--ttl",
        "3m",
        "--policy",
        "reset",
        "--rst-rate",
        "50",
        "--allow",
        "198.18.0.0/15",
        "--announce",
        "10s",
        "--quiet",
        "2s",
        "--maint",
    ]);
    let p = plan(&gate, &sv(&b));
    assert_eq!(p["changed"], true, "{p}");
    let got = diffs(&p);
    let fields: Vec<&str> = got.iter().map(|(f, _, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "ports",
            "policy",
            "allow",
            "interfaces",
            "ttl_ms",
            "rst_rate",
            "maint"
        ],
        "{p}"
    );
    assert_eq!(
        got[0],
        d(
            "ports",
            serde_json::json!([P]),
            serde_json::json!([P, 8461])
        )
    );
    assert_eq!(got[1], d("policy", "drop".into(), "reset".into()));
    assert_eq!(
        got[2],
        d(
            "allow",
            serde_json::json!([]),
            serde_json::json!(["198.18.0.0/15"])
        )
    );
    let mut after = vec![
        serde_json::json!({
            "name": "lo", "attach": "tc",
            "reason": "auto: virtual device (loopback): TC, as XDP there gains nothing",
        }),
        on_veth.clone(),
    ];
    after.sort_by_key(|v| v["name"].as_str().unwrap().to_owned());
    assert_eq!(
        got[3],
        d(
            "interfaces",
            serde_json::json!([on_veth]),
            Json::Array(after)
        )
    );
    assert_eq!(got[4], d("ttl_ms", 120_000.into(), 180_000.into()));
    assert_eq!(got[5], d("rst_rate", 1000.into(), 50.into()));
    // A gate that refuses is not reopened by --announce: no announce_ms difference.
    assert_eq!(got[6], d("maint", false.into(), true.into()));

    // Only the TTL: a change (status reports the setting, not just the time left).
    let p = plan(&gate, &sv(&on(&["--ttl", "5m"])));
    assert_eq!(
        diffs(&p),
        [d("ttl_ms", 120_000.into(), 300_000.into())],
        "{p}"
    );
    let p = plan(&gate, &sv(&on(&["--rst-rate", "7"])));
    assert_eq!(diffs(&p), [d("rst_rate", 1000.into(), 7.into())], "{p}");

    // Bad input: the same line and exit 2 with --dry-run as without, nothing changed.
    for bad in [
        &["--ttl", "0s"][..],
        &["--iface", "nosuch0"],
        &["--allow", "198.18.3.77/8"],
        &["--announce", "15m"],
        &["--port", "0"],
    ] {
        let before = snapshot(&gate);
        let mut real = vec!["gate", "on", "--port", &port];
        real.extend_from_slice(bad);
        let plain = gate.run(&real);
        real.push("--dry-run");
        let dry = gate.run(&real);
        assert_eq!(plain.code, Some(2), "{plain}");
        assert_eq!(dry.code, Some(2), "{dry}");
        assert_eq!(dry.stderr, plain.stderr, "{bad:?}");
        assert_eq!(dry.stderr.lines().count(), 1, "{dry}");
        assert_eq!(snapshot(&gate), before, "{bad:?} changed the host");
    }

    // gate off --dry-run: what goes; the gate stays.
    let p = plan(&gate, &["off"]);
    assert_eq!(p["action"], "off");
    assert_eq!(p["changed"], true, "{p}");
    assert_eq!(
        diffs(&p),
        [
            d("gate", "on".into(), "none".into()),
            d("ports", serde_json::json!([P]), serde_json::json!([])),
            d(
                "interfaces",
                serde_json::json!([on_veth]),
                serde_json::json!([])
            ),
        ],
        "{p}"
    );
    assert_eq!(gate.status()["gate"], "on");
    gate.off();
    let p = plan(&gate, &["off"]);
    assert_eq!(p["changed"], false, "{p}");
}
