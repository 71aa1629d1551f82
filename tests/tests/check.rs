//! `drain-user check`, the preflight, in a test namespace: it passes here (exit 0, every
//! documented JSON field), reports a foreign XDP program and blocks `--attach xdp` on it
//! while `tc` and `auto` pass, blocks without privileges, and changes nothing on the host.
//! (The decisions for other kernels — too old, no TCX — are unit tests on
//! synthetic probes in drain-user/src/ops/check.rs.)

use drain_tests::{
    cli::{CliOutput, Drain, Json, JsonExt, NOBODY},
    netns::NetNsPair,
    object::{link_xdp, ForeignXdp, PinDir},
};

fn json(out: &CliOutput) -> Json {
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("check --json ({e}): {out}"))
}

fn check_named<'j>(r: &'j Json, prefix: &str) -> &'j Json {
    r["checks"]
        .arr()
        .iter()
        .find(|c| c["name"].str().starts_with(prefix))
        .unwrap_or_else(|| panic!("no check {prefix:?}: {r}"))
}

fn iface<'j>(r: &'j Json, name: &str) -> &'j Json {
    r["interfaces"]
        .arr()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no interface {name}: {r}"))
}

/// Nothing of the probe is left in bpffs, and no gate state was made. (Checks of other
/// tests may be running: only the probe directory of a process that has exited is a leak.)
fn assert_nothing_left(drain: &Drain) {
    assert!(!drain.state_dir().exists(), "check made a gate");
    let probes: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("drain-check-")?.to_owned();
            (!std::path::Path::new("/proc").join(pid).exists()).then_some(name)
        })
        .collect();
    assert!(probes.is_empty(), "probe pins left: {probes:?}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn check_passes_here_and_says_what_it_probed() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let out = drain.run(&["check", "--port", "80,443", "--json"]);
    out.expect_ok();
    let r = json(&out);
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["problem"].is_null(), "{r}");
    assert!(!r["kernel"].str().is_empty());
    for c in r["checks"].arr() {
        assert!(c["needed"].as_bool().is_some(), "{c}");
        assert!(c["detail"].as_str().is_some(), "{c}");
        if c["needed"] == true {
            assert_eq!(c["status"], "ok", "{r}");
        }
    }
    for name in [
        "kernel",
        "privileges",
        "btf",
        "bpffs",
        "bpf_link for XDP",
        "tp_btf",
        "mmapable",
        "ring buffer",
        "sk_lookup",
        "drain's programs",
    ] {
        let c = check_named(&r, name);
        assert_eq!(c["status"], "ok", "this kernel (6.x) has {name}: {r}");
    }
    // TCX (6.6): present on a current kernel; on the matrix's 5.10 and 6.1 `check`
    // must report it missing rather than claim it, and say that --attach tc takes the
    // clsact path there. The clsact path itself is probed (attached in a private
    // namespace) everywhere.
    let tcx = check_named(&r, "TCX");
    if drain_tests::kernel::has(drain_tests::kernel::Feature::Tcx) {
        assert_eq!(tcx["status"], "ok", "this kernel has TCX: {r}");
    } else {
        assert_eq!(tcx["status"], "missing", "this kernel has no TCX: {r}");
        assert!(tcx["detail"].str().contains("clsact"), "{r}");
    }
    assert_eq!(check_named(&r, "clsact")["status"], "ok", "{r}");
    assert_eq!(check_named(&r, "kernel")["min_kernel"], "5.10");
    assert_eq!(check_named(&r, "TCX")["min_kernel"], "6.6");
    // The namespace's interfaces: veth has native XDP, lo only generic.
    // The kernel says which drivers have native XDP through the netdev family's
    // xdp-features (6.3+); an older kernel cannot tell, and check reports null (unknown)
    // rather than guess. Only a kernel of the matrix without TCX (5.10, 6.1) may do that.
    let native = |name: &str| {
        let v = &iface(&r, name)["xdp_native"];
        if v.is_null() {
            assert!(
                !drain_tests::kernel::has(drain_tests::kernel::Feature::Tcx),
                "xdp_native unknown for {name} on a kernel with xdp-features: {r}"
            );
        }
        v.as_bool()
    };
    let veth = iface(&r, &pair.veth_a);
    assert_ne!(native(&pair.veth_a), Some(false), "{r}");
    // The default, auto: TC on a veth, and why.
    assert_eq!(veth["attach"], "tc", "{r}");
    assert_eq!(
        veth["reason"], "auto: virtual device (veth): TC keeps the peer's TSO",
        "{r}"
    );
    assert!(veth["xdp_other"].is_null(), "{r}");
    assert_ne!(native("lo"), Some(true), "{r}");
    assert_nothing_left(&drain);

    let out = drain.run(&["check"]);
    out.expect_ok();
    assert!(out.stdout.contains("result: a gate can work here"), "{out}");

    // Bad input is a usage error, as for gate on.
    drain.run(&["check", "--iface", "nosuch0"]).expect_code(2);
    assert_nothing_left(&drain);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn check_reports_a_foreign_xdp_program_and_blocks_attach_xdp_only() {
    // tc and auto pass with TCX and, without it, through the clsact path.
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    // Negative run first: the free interface passes.
    drain
        .run(&["check", "--iface", &pair.veth_a, "--json"])
        .expect_ok();
    let pins = PinDir::new();
    let foreign = ForeignXdp::attach_with_ip(&pair, &pair.a, &pair.veth_a, &pins);
    let args = |attach: &'static str| {
        [
            "check",
            "--iface",
            pair.veth_a.as_str(),
            "--attach",
            attach,
            "--json",
        ]
    };
    let out = drain.run(&args("xdp"));
    out.expect_code(1);
    let r = json(&out);
    assert_eq!(r["ok"], false);
    let problem = r["problem"].str();
    assert!(
        problem.contains(ForeignXdp::NAME)
            && problem.contains(&foreign.id.to_string())
            && problem.contains(&pair.veth_a)
            && problem.contains("--attach tc"),
        "{r}"
    );
    let veth = iface(&r, &pair.veth_a);
    assert_eq!(
        veth["xdp_other"],
        format!("{}, id {}", ForeignXdp::NAME, foreign.id),
        "{r}"
    );
    assert!(veth["attach"].is_null(), "{r}");
    // The error is also the one line on stderr.
    assert_eq!(out.stderr_lines().len(), 1, "{out}");
    assert!(out.stderr.contains(ForeignXdp::NAME), "{out}");

    for (attach, why) in [
        ("tc", "--attach tc"),
        (
            "auto",
            "auto: another program holds the XDP hook: TC runs beside it",
        ),
    ] {
        let out = drain.run(&args(attach));
        out.expect_ok();
        let r = json(&out);
        let veth = iface(&r, &pair.veth_a);
        assert_eq!(veth["attach"], "tc", "{out}");
        assert_eq!(veth["reason"], why, "{out}");
    }
    // The foreign program was not touched.
    assert_eq!(
        link_xdp(&pair, &pair.a, &pair.veth_a),
        Some((foreign.id, ForeignXdp::NAME.to_owned()))
    );
    assert_nothing_left(&drain);
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn check_without_privileges_blocks_and_says_why() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let nobody = NOBODY;
    let out = drain.run_via(nobody, &["check", "--json"]);
    out.expect_code(1);
    let r = json(&out);
    assert_eq!(check_named(&r, "privileges")["status"], "missing", "{r}");
    assert!(r["problem"].str().contains("needs root"), "{r}");
    assert_nothing_left(&drain);
}

/// On a kernel without TCX (here: behaving as one, `DRAIN_NO_TCX`), `check --attach tc`
/// passes: the TCX row says missing and that the classic clsact path is used instead, the
/// clsact row is needed and ok, each interface's note names clsact; and `--attach auto`
/// beside a foreign XDP program too. With TCX, the same check names TCX (the negative run).
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn check_without_tcx_says_tc_takes_the_clsact_path() {
    let pair = NetNsPair::new();
    let classic = Drain::classic(&pair, &pair.a);
    let out = classic.run(&["check", "--attach", "tc", "--json"]);
    out.expect_ok();
    let r = json(&out);
    assert_eq!(r["ok"], true, "{r}");
    let tcx = check_named(&r, "TCX");
    assert_eq!(tcx["status"], "missing", "{r}");
    assert_eq!(tcx["needed"], false, "{r}");
    assert!(tcx["detail"].str().contains("clsact"), "{r}");
    let clsact = check_named(&r, "clsact");
    assert_eq!(
        (clsact["status"].str(), &clsact["needed"]),
        ("ok", &Json::Bool(true)),
        "{r}"
    );
    let note = iface(&r, &pair.veth_a)["note"].str();
    assert!(note.contains("clsact"), "{r}");
    let pins = PinDir::new();
    let _foreign = ForeignXdp::attach_with_ip(&pair, &pair.a, &pair.veth_a, &pins);
    let out = classic.run(&[
        "check",
        "--attach",
        "auto",
        "--iface",
        &pair.veth_a,
        "--json",
    ]);
    out.expect_ok();
    let r = json(&out);
    let veth = iface(&r, &pair.veth_a);
    assert_eq!(veth["attach"], "tc", "{r}");
    assert!(veth["note"].str().contains("clsact"), "{r}");
    assert_nothing_left(&classic);
    // Where the kernel has TCX, the same check without the override names TCX.
    if drain_tests::kernel::has(drain_tests::kernel::Feature::Tcx) {
        let drain = Drain::new(&pair, &pair.a);
        let r = json(
            drain
                .run(&["check", "--attach", "tc", "--json"])
                .expect_ok(),
        );
        assert_eq!(check_named(&r, "TCX")["status"], "ok", "{r}");
        assert_eq!(check_named(&r, "clsact")["needed"], false, "{r}");
        assert!(iface(&r, &pair.veth_a)["note"].str().contains("TCX"), "{r}");
    }
}

/// `check` probes RLIMIT_MEMLOCK as `gate on` will meet it, and its verdict is `gate on`'s:
/// under each limit below (set with prlimit, CAP_SYS_RESOURCE dropped with setpriv where
/// said), `check` passes exactly when `gate on` under the same limit works. On a kernel
/// that charges BPF maps to the limit (before 5.11; probed by the test itself, not from the
/// version) 64 KiB that cannot be raised is refused by both, `check` with one line naming
/// the limit and the fix; a limit drain-user may raise (hard limit unlimited, or
/// CAP_SYS_RESOURCE) or one large enough passes. Where maps are charged to the memory
/// cgroup the row is not needed and every limit passes.
#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn check_says_whether_gate_on_fits_the_memlock_limit() {
    let pair = NetNsPair::new();
    let drain = Drain::new(&pair, &pair.a);
    let charged = drain_tests::kernel::maps_charged_to_memlock();
    let no_resource: &[&str] = &[
        "setpriv",
        "--bounding-set=-sys_resource",
        "--inh-caps=-sys_resource",
        "--ambient-caps=-sys_resource",
    ];
    // Limits above this process's hard limit need CAP_SYS_RESOURCE (root in the kernel
    // matrix's guests has it; this machine's root may not): where it is missing, the cases
    // that need it cannot be set up, which matters only where maps are charged.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out pointer.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) },
        0
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_sys_resource = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|eff| eff & (1 << 24) != 0);
    let can_raise = cap_sys_resource || lim.rlim_max == libc::RLIM_INFINITY;
    assert!(
        can_raise || !charged,
        "maps are charged to RLIMIT_MEMLOCK here, and this test cannot set the limits that \
         prove check's verdict (no CAP_SYS_RESOURCE, hard limit {})",
        lim.rlim_max
    );
    let big = if can_raise { 1 << 30 } else { lim.rlim_max };
    let big_limit = format!("--memlock={big}:{big}");
    let mut cases: Vec<(String, &str, &[&str], bool)> = vec![(
        "64 KiB, hard 64 KiB, no CAP_SYS_RESOURCE".into(),
        "--memlock=65536:65536",
        no_resource,
        !charged,
    )];
    if can_raise {
        cases.push((
            "64 KiB, hard unlimited, no CAP_SYS_RESOURCE".into(),
            "--memlock=65536:unlimited",
            no_resource,
            true,
        ));
    } else {
        eprintln!("not set up: a hard limit of unlimited (this process cannot raise its own)");
    }
    if cap_sys_resource {
        cases.push((
            "64 KiB, hard 64 KiB, CAP_SYS_RESOURCE".into(),
            "--memlock=65536:65536",
            &[],
            true,
        ));
    } else {
        eprintln!("not set up: CAP_SYS_RESOURCE (this process lacks it)");
    }
    cases.push((
        format!("{} KiB, hard the same, no CAP_SYS_RESOURCE", big >> 10),
        &big_limit,
        no_resource,
        true,
    ));
    for (what, limit, caps, works) in cases {
        let wrapper: Vec<&str> = ["prlimit", limit]
            .into_iter()
            .chain(caps.iter().copied())
            .collect();
        let out = drain.run_via(&wrapper, &["check", "--iface", &pair.veth_a, "--json"]);
        let r = json(&out);
        let row = check_named(&r, "locked memory");
        eprintln!(
            "{what}: check ok {}, memlock {} (needed {}): {}",
            r["ok"], row["status"], row["needed"], row["detail"]
        );
        assert_eq!(row["needed"], charged, "{what}: {r}");
        let on = drain.run_via(
            &wrapper,
            &["gate", "on", "--port", "8080", "--iface", &pair.veth_a],
        );
        if works {
            out.expect_ok();
            assert_eq!(row["status"], "ok", "{what}: {r}");
            on.expect_ok();
            drain.off();
        } else {
            out.expect_code(1);
            assert_eq!(row["status"], "missing", "{what}: {r}");
            let problem = r["problem"].str();
            for w in [
                "RLIMIT_MEMLOCK",
                "64 KiB",
                "ulimit -l unlimited",
                "CAP_SYS_RESOURCE",
            ] {
                assert!(problem.contains(w), "{what}: the problem names {w:?}: {r}");
            }
            assert_eq!(out.stderr_lines().len(), 1, "{out}");
            on.expect_code(1);
            assert!(on.stderr.contains("RLIMIT_MEMLOCK"), "{what}: {on}");
        }
        assert_nothing_left(&drain);
    }
}
