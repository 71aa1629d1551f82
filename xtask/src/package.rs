//! `cargo xtask deb`: the Debian package.
//!
//! Builds the self-contained release binary, renders the man pages and shell completions
//! from drain-user's clap definition (so they cannot drift from `--help`), and hands the
//! asset list in drain-user/Cargo.toml (`[package.metadata.deb]`) to cargo-deb, installed
//! at a pinned version when missing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use drain_user::cli::Cli;

use crate::{capture, run, target_dir, workspace_root};

/// The cargo-deb release the asset list was written for (it builds with stable 1.95).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Builds target/debian/drain-user_<version>-1_<arch>.deb and returns its path.
pub fn deb() -> Result<PathBuf> {
    crate::build(true)?;
    let assets = target_dir().join("release/assets");
    render_assets(&assets)?;
    ensure_cargo_deb()?;
    let out_dir = target_dir().join("debian");
    // A stale package of another version must not be picked up by the tests.
    let _ = fs::remove_dir_all(&out_dir);
    let stdout = capture(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["deb", "--package", "drain-user", "--no-build", "--output"])
            .arg(&out_dir),
    )
    .context("cargo deb failed")?;
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no package path: {stdout}"))?;
    println!("{}", deb.display());
    Ok(deb)
}

/// man/drain-user.1 plus one page per subcommand (drain-user-gate-on.1, ...), and the
/// bash, zsh and fish completions, all generated from [`Cli`].
fn render_assets(dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    let man = dir.join("man");
    let completions = dir.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).context("rendering the man pages")?;
    for (shell, file) in [
        (Shell::Bash, "drain-user.bash"),
        (Shell::Zsh, "_drain-user"),
        (Shell::Fish, "drain-user.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "drain-user", &mut script);
        let mut script = String::from_utf8(script)?;
        if shell == Shell::Bash {
            script = fix_bash_hyphen(&script)?;
        }
        fs::write(completions.join(file), script)?;
    }
    Ok(())
}

/// clap_complete's bash script spells the dispatch state of a hyphenated binary name two
/// ways (the loop sets `drain__user__subcmd__gate`, the arms match
/// `drain__subcmd__user__subcmd__gate`), so nothing past the first word completes
/// (clap-rs/clap#6421, open). Spell the arms the way the loop does.
fn fix_bash_hyphen(script: &str) -> Result<String> {
    let fixed = script.replace("drain__subcmd__user", "drain__user");
    if !fixed.contains("drain__user__subcmd__gate)") {
        bail!("the bash completion no longer has the shape this workaround expects");
    }
    Ok(fixed)
}

fn ensure_cargo_deb() -> Result<()> {
    if capture(Command::new("cargo").args(["deb", "--version"]))
        .is_ok_and(|v| v.contains(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION}");
    run(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))
    .context("installing cargo-deb failed")?;
    if !capture(Command::new("cargo").args(["deb", "--version"]))?.contains(CARGO_DEB_VERSION) {
        bail!("cargo deb is not version {CARGO_DEB_VERSION} after installing it");
    }
    Ok(())
}
