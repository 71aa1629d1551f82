//! The Debian package, as an operator gets it: `dpkg -i` the .deb that `cargo xtask deb`
//! builds, run a gate cycle with the installed /usr/bin/drain-user in a test namespace, read
//! its man page, load its bash completion, then `dpkg --purge` and check that every file
//! the package installed is gone.
//!
//! The package is `$DRAIN_DEB` when set, else built here with `cargo xtask deb`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use drain_tests::{
    cli::{port_status, Drain},
    netns::NetNsPair,
    object::object_path,
    traffic::{connect, EchoServer},
};

const PKG: &str = "drain-user";
const BIN: &str = "/usr/bin/drain-user";
const PORT: u16 = 8080;

/// Runs a command to the end; returns (success, stdout, stderr).
fn sh(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn sh_ok(program: &str, args: &[&str]) -> String {
    let (ok, out, err) = sh(program, args);
    assert!(ok, "{program} {args:?} failed:\n{out}\n{err}");
    out
}

fn installed() -> bool {
    sh("dpkg-query", &["-W", "-f=${Status}", PKG]).1 == "install ok installed"
}

/// The .deb to test: `$DRAIN_DEB`, else the one `cargo xtask deb` builds now.
fn package() -> PathBuf {
    if let Some(p) = std::env::var_os("DRAIN_DEB") {
        return p.into();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["xtask", "deb"])
        .output()
        .expect("running cargo xtask deb");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo xtask deb failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = stdout.lines().last().expect("xtask deb prints the path");
    PathBuf::from(deb.trim())
}

/// Purges the package when dropped, so a failed test leaves nothing installed.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let (ok, out, err) = sh("dpkg", &["--purge", PKG]);
            if !ok {
                eprintln!("cleanup: dpkg --purge {PKG} failed: {out}{err}");
            }
        }
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn package_installs_runs_a_gate_cycle_documents_itself_and_purges_clean() {
    drain_tests::require_root();
    let deb = package();
    assert!(deb.exists(), "{} is missing", deb.display());
    // A leftover from an earlier failed run would hide what this package installs.
    if installed() {
        sh_ok("dpkg", &["--purge", PKG]);
    }
    assert!(!Path::new(BIN).exists(), "{BIN} exists before installing");

    let guard = Installed;
    sh_ok("dpkg", &["-i", deb.to_str().unwrap()]);
    assert!(installed(), "dpkg -i did not leave {PKG} installed");
    let files: Vec<PathBuf> = sh_ok("dpkg", &["-L", PKG])
        .lines()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    for want in [
        BIN,
        "/usr/share/bash-completion/completions/drain-user",
        "/usr/share/zsh/vendor-completions/_drain-user",
        "/usr/share/fish/vendor_completions.d/drain-user.fish",
        "/usr/share/doc/drain-user/README.md",
        "/usr/share/doc/drain-user/LICENSE-MIT",
        "/usr/share/doc/drain-user/LICENSE-APACHE",
        "/usr/share/doc/drain-user/copyright",
    ] {
        assert!(
            files.iter().any(|f| f == Path::new(want)),
            "{want} not installed; dpkg -L: {files:?}"
        );
    }
    for page in ["drain-user", "drain-user-gate-on", "drain-user-status"] {
        assert!(
            files.iter().any(|f| f.starts_with("/usr/share/man/man1/")
                && f.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{page}.1"))),
            "man page {page}.1 not installed: {files:?}"
        );
    }

    // --version: the package version and the hash of the kernel object it embeds, which is
    // the one the workspace built.
    let version = sh_ok(BIN, &["--version"]);
    let obj = std::fs::read(object_path()).expect("reading the eBPF object");
    let sha = sh_ok("sha256sum", &[object_path().to_str().unwrap()]);
    assert!(!obj.is_empty());
    assert_eq!(
        version.trim(),
        format!(
            "drain-user {} (kernel object sha256 {})",
            env!("CARGO_PKG_VERSION"),
            &sha[..12]
        ),
        "--version"
    );

    // A full gate cycle with the installed binary, in a test namespace.
    let pair = NetNsPair::new();
    let drain = Drain::with_bin(&pair, &pair.a, BIN.into());
    let server = EchoServer::start(&pair, &pair.a, SocketAddr::new(pair.a_v4.into(), PORT));
    assert!(connect(&pair, &pair.b, server.addr, Duration::from_secs(5)).is_ok());
    drain.on(&["--port", &PORT.to_string(), "--ttl", "5m"]);
    let refused = connect(&pair, &pair.b, server.addr, Duration::from_secs(1));
    assert!(refused.is_timed_out(), "gated connect: {refused:?}");
    let st = drain.status();
    assert_eq!(st["gate"], "on", "{st}");
    let p = port_status(&st, PORT).expect("the port is gated");
    assert!(p["syns_refused"].as_u64() >= Some(1), "{st}");
    drain.off();
    assert_eq!(drain.status()["gate"], "off");
    assert!(connect(&pair, &pair.b, server.addr, Duration::from_secs(5)).is_ok());
    assert!(drain.pins().is_empty(), "pins left: {:?}", drain.pins());

    // The man page renders through man(1), found by name like an operator would.
    let (ok, page, err) = sh("man", &["-P", "cat", "drain-user"]);
    assert!(ok, "man drain-user failed: {err}");
    // man justifies a wrapped line with extra spaces (the NAME line wraps at 80 columns
    // once the synopsis grows): compare with white space folded.
    let page = page.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "drain-user",
        "gate",
        "status",
        "wait",
        "Refuse new TCP connections",
    ] {
        assert!(
            page.contains(want),
            "man drain-user lacks {want:?}:\n{page}"
        );
    }
    let (ok, page, err) = sh("man", &["-P", "cat", "drain-user-gate-on"]);
    assert!(
        ok && page.contains("--ttl"),
        "man drain-user-gate-on: {err}\n{page}"
    );

    // The bash completion loads, registers itself, and its function (whatever it is
    // called) completes subcommands.
    let script = "source /usr/share/bash-completion/completions/drain-user && \
                  complete -p drain-user && \
                  f=$(complete -p drain-user | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p') && \
                  COMP_WORDS=(drain-user gate '') COMP_CWORD=2 COMP_LINE='drain-user gate ' \
                  COMP_POINT=16 && \"$f\" drain-user '' gate && echo \"${COMPREPLY[*]}\"";
    let out = sh_ok("bash", &["-c", script]);
    assert!(
        out.starts_with("complete ") && out.contains(" -F ") && out.contains(" drain-user\n"),
        "complete -p: {out}"
    );
    let words: Vec<&str> = out.lines().last().unwrap().split_whitespace().collect();
    assert!(
        words.contains(&"on") && words.contains(&"off"),
        "`drain-user gate <TAB>` offers {words:?}"
    );

    // Purge: every file the package listed is gone, and so is the package.
    drop(drain);
    sh_ok("dpkg", &["--purge", PKG]);
    assert!(!installed(), "{PKG} still installed after --purge");
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "left after dpkg --purge: {left:?}");
    assert!(!Path::new("/usr/share/doc/drain-user").exists());
    drop(guard);
}
