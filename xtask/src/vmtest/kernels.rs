//! Debian's own kernel packages for the matrix: resolved through apt's indices under a
//! private apt configuration (its own sources list, lists, cache and state under
//! target/vmtest/apt: nothing is installed on the host and the host's apt state is not
//! touched), pinned in `xtask/vmtest.lock` (package, version, sha256), downloaded with
//! `apt-get download`, checked against the lock, unpacked, and turned into what a boot
//! needs: the kernel image and an initramfs part with the kernel's modules (modules.dep made
//! by depmod, so the guest's modprobe and the kernel's on-demand loading work).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use super::cpio::Cpio;
use crate::{capture, run, workspace_root};

/// One line of the matrix: which Debian suite's cloud kernel it boots.
pub struct Line {
    pub name: &'static str,
    pub suite: &'static str,
    /// Whether the suite lives in the security archive (else the main one).
    security: bool,
    pub about: &'static str,
}

pub const LINES: &[Line] = &[
    Line {
        name: "5.10",
        suite: "bullseye-security",
        security: true,
        about: "Debian 11; the kernel line of Amazon Linux 2",
    },
    Line {
        name: "6.1",
        suite: "bookworm-security",
        security: true,
        about: "Debian 12; the kernel line of Amazon Linux 2023",
    },
    Line {
        name: "6.12",
        suite: "trixie-security",
        security: true,
        about: "Debian 13",
    },
    Line {
        name: "latest",
        suite: "trixie-backports",
        security: false,
        about: "the newest kernel Debian ships (trixie-backports)",
    },
];

/// The metapackage whose dependencies name the concrete kernel packages of a suite. The
/// cloud flavour: virtio drivers, no hardware zoo, small; its lack of 9p is why the guest's
/// files travel in the initramfs.
const META: &str = "linux-image-cloud-amd64";

pub fn lock_path() -> PathBuf {
    workspace_root().join("xtask/vmtest.lock")
}

/// A pinned package: (kernel line, suite, package, version, sha256).
#[derive(Clone, Debug, PartialEq)]
pub struct Pin {
    pub line: String,
    pub suite: String,
    pub package: String,
    pub version: String,
    pub sha256: String,
}

pub fn read_lock() -> Result<Vec<Pin>> {
    let path = lock_path();
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: create it with `cargo xtask vmtest --refresh-lock`",
            path.display()
        )
    })?;
    let mut pins = Vec::new();
    for (n, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        ensure!(
            f.len() == 5 && f[4].len() == 64,
            "{}:{}: expected `kernel suite package version sha256`",
            path.display(),
            n + 1
        );
        pins.push(Pin {
            line: f[0].into(),
            suite: f[1].into(),
            package: f[2].into(),
            version: f[3].into(),
            sha256: f[4].into(),
        });
    }
    Ok(pins)
}

fn write_lock(pins: &[Pin]) -> Result<()> {
    let mut s = String::from(
        "# cargo xtask vmtest: the Debian kernel packages each line of the matrix boots.\n\
         # Checked on every download (sha256). Versions drift with security updates and the\n\
         # security suites keep only the newest: refresh deliberately with\n\
         # `cargo xtask vmtest --refresh-lock` (the newest linux-image-cloud-amd64 of each suite,\n\
         # resolved through apt's indices) and commit the result.\n\
         # kernel  suite  package  version  sha256\n",
    );
    for p in pins {
        s += &format!(
            "{} {} {} {} {}\n",
            p.line, p.suite, p.package, p.version, p.sha256
        );
    }
    fs::write(lock_path(), s).context("writing the lock file")
}

/// The private apt configuration.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// Writes the configuration (idempotent). The archives are the ones the host's apt
    /// already uses, found through `apt-cache policy`.
    pub fn new(cache: &Path) -> Result<Self> {
        let dir = cache.join("apt");
        for d in [
            "lists/partial",
            "cache/archives/partial",
            "state",
            "etc/sources.list.d",
            "etc/apt.conf.d",
            "etc/preferences.d",
        ] {
            fs::create_dir_all(dir.join(d))?;
        }
        if !dir.join("status").exists() {
            fs::write(dir.join("status"), "")?;
        }
        let (main, security) = host_archives()?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        ensure!(
            Path::new(keyring).exists(),
            "{keyring} is missing: install debian-archive-keyring"
        );
        let mut sources = String::new();
        for l in LINES {
            let uri = if l.security { &security } else { &main };
            sources += &format!("deb [signed-by={keyring}] {uri} {} main\n", l.suite);
        }
        let d = dir.display();
        let conf = format!(
            "Dir::Etc::SourceList \"{d}/etc/sources.list\";\n\
             Dir::Etc::SourceParts \"{d}/etc/sources.list.d\";\n\
             Dir::Etc::Parts \"{d}/etc/apt.conf.d\";\n\
             Dir::Etc::Preferences \"{d}/etc/preferences\";\n\
             Dir::Etc::PreferencesParts \"{d}/etc/preferences.d\";\n\
             Dir::State \"{d}/state\";\n\
             Dir::State::Lists \"{d}/lists\";\n\
             Dir::State::status \"{d}/status\";\n\
             Dir::Cache \"{d}/cache\";\n\
             Debug::NoLocking \"true\";\n\
             APT::Sandbox::User \"root\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n\
             Acquire::Languages \"none\";\n"
        );
        let sources_path = dir.join("etc/sources.list");
        let changed = fs::read_to_string(&sources_path).ok().as_deref() != Some(&sources);
        fs::write(&sources_path, &sources)?;
        fs::write(dir.join("apt.conf"), conf)?;
        let apt = Self { dir };
        if changed {
            let _ = fs::remove_dir_all(apt.dir.join("lists"));
            fs::create_dir_all(apt.dir.join("lists/partial"))?;
        }
        Ok(apt)
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.dir.join("apt.conf"));
        c
    }

    pub fn update(&self) -> Result<()> {
        eprintln!(
            "vmtest: apt-get update (private configuration, {} suites)",
            LINES.len()
        );
        run(self.cmd("apt-get").args(["update", "-qq"]))
            .context("apt-get update under the private configuration failed")
    }

    fn has_lists(&self) -> bool {
        fs::read_dir(self.dir.join("lists"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
            })
            .unwrap_or(false)
    }

    fn show(&self, pkg: &str, version: &str) -> Result<String> {
        capture(
            self.cmd("apt-cache")
                .args(["show", &format!("{pkg}={version}")]),
        )
    }

    /// The newest `linux-image-cloud-amd64` of a suite and the kernel packages it pulls in
    /// (dependencies pinned to the same version, named `linux-*`), with their sha256.
    fn resolve(&self, line: &Line) -> Result<Vec<Pin>> {
        let madison = capture(self.cmd("apt-cache").args(["madison", META]))?;
        let mut versions: Vec<String> = madison
            .lines()
            .filter(|l| l.contains(&format!(" {}/", line.suite)))
            .filter_map(|l| l.split('|').nth(1).map(|v| v.trim().to_owned()))
            .collect();
        ensure!(!versions.is_empty(), "no {META} in {}", line.suite);
        // madison lists the newest first; sort anyway with dpkg's own comparison.
        versions.sort_by(|a, b| {
            let newer = Command::new("dpkg")
                .args(["--compare-versions", a, "gt", b])
                .status()
                .is_ok_and(|s| s.success());
            if newer {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        let version = versions.swap_remove(0);
        let mut todo = vec![META.to_owned()];
        let mut pins: Vec<Pin> = Vec::new();
        while let Some(pkg) = todo.pop() {
            if pins.iter().any(|p| p.package == pkg) {
                continue;
            }
            let rec = self.show(&pkg, &version)?;
            let rec = rec.split("\n\n").next().unwrap_or_default();
            let field = |name: &str| {
                rec.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .map(str::to_owned)
            };
            let sha256 = field("SHA256").with_context(|| format!("{pkg}: no SHA256"))?;
            if let Some(deps) = field("Depends") {
                for alt in deps.split(',') {
                    let dep = alt.trim();
                    // Only the kernel's own packages, pinned to this exact version.
                    if dep.starts_with("linux-") && dep.ends_with(&format!("(= {version})")) {
                        todo.push(dep.split_whitespace().next().unwrap().to_owned());
                    }
                }
            }
            if pkg != META {
                pins.push(Pin {
                    line: line.name.into(),
                    suite: line.suite.into(),
                    package: pkg,
                    version: version.clone(),
                    sha256,
                });
            }
        }
        pins.sort_by(|a, b| a.package.cmp(&b.package));
        Ok(pins)
    }

    /// Downloads the pinned packages into `debs` (kept there as the download cache) and
    /// checks each against the lock. Returns their paths.
    fn download(&self, pins: &[&Pin], debs: &Path) -> Result<Vec<PathBuf>> {
        fs::create_dir_all(debs)?;
        let file = |p: &Pin| {
            debs.join(format!(
                "{}_{}_amd64.deb",
                p.package,
                p.version.replace(':', "%3a")
            ))
        };
        let missing: Vec<&&Pin> = pins
            .iter()
            .filter(|p| sha256(&file(p)).ok().as_deref() != Some(&p.sha256))
            .collect();
        if !missing.is_empty() {
            if !self.has_lists() {
                self.update()?;
            }
            let args: Vec<String> = missing
                .iter()
                .map(|p| format!("{}={}", p.package, p.version))
                .collect();
            eprintln!("vmtest: apt-get download {}", args.join(" "));
            let get = || {
                run(self
                    .cmd("apt-get")
                    .current_dir(debs)
                    .arg("download")
                    .args(&args))
            };
            if get().is_err() {
                // Stale indices: refresh once and retry.
                self.update()?;
                get().with_context(|| {
                    format!(
                        "downloading the pinned kernel packages failed: the security suites \
                         keep only their newest upload, so a pin can disappear; run \
                         `cargo xtask vmtest --refresh-lock` and commit {}",
                        lock_path().display()
                    )
                })?;
            }
        }
        let mut out = Vec::new();
        for p in pins {
            let f = file(p);
            let got = sha256(&f)?;
            ensure!(
                got == p.sha256,
                "{}: sha256 {got} does not match the lock ({}): the archive changed the \
                 package under the same version; refresh the lock deliberately \
                 (`cargo xtask vmtest --refresh-lock`) if that is expected",
                f.display(),
                p.sha256
            );
            out.push(f);
        }
        Ok(out)
    }
}

/// `cargo xtask vmtest --refresh-lock`: resolves every line again and rewrites the lock.
pub fn refresh_lock(cache: &Path) -> Result<()> {
    let apt = Apt::new(cache)?;
    apt.update()?;
    let mut pins = Vec::new();
    for l in LINES {
        let p = apt.resolve(l)?;
        for pin in &p {
            eprintln!("vmtest: {} -> {} {}", l.name, pin.package, pin.version);
        }
        pins.extend(p);
    }
    let old = read_lock().unwrap_or_default();
    write_lock(&pins)?;
    if old == pins {
        eprintln!("vmtest: {} unchanged", lock_path().display());
    } else {
        eprintln!("vmtest: {} rewritten: commit it", lock_path().display());
    }
    Ok(())
}

fn sha256(path: &Path) -> Result<String> {
    let out = capture(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().unwrap_or_default().to_owned())
}

/// A kernel ready to boot: its image, its release string and an initramfs part holding its
/// modules under /usr/lib/modules/<release>.
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_cpio: PathBuf,
}

/// Downloads (when not cached) and unpacks the kernel of `line` as pinned in the lock.
pub fn prepare(cache: &Path, line: &str) -> Result<Kernel> {
    let lock = read_lock()?;
    let pins: Vec<&Pin> = lock.iter().filter(|p| p.line == line).collect();
    ensure!(
        !pins.is_empty(),
        "{} has no entry for kernel {line}: run `cargo xtask vmtest --refresh-lock`",
        lock_path().display()
    );
    // The unpacked kernel is cached under a name that covers every pinned hash.
    let key = super::fnv_hex(
        pins.iter()
            .map(|p| format!("{} {} {}", p.package, p.version, p.sha256)),
    );
    let dir = cache.join("kernels").join(format!("{line}-{key}"));
    let done = dir.join("release");
    if let Ok(release) = fs::read_to_string(&done) {
        return Ok(Kernel {
            release: release.trim().into(),
            vmlinuz: dir.join("vmlinuz"),
            modules_cpio: dir.join("modules.cpio"),
        });
    }
    let apt = Apt::new(cache)?;
    let debs = apt.download(&pins, &cache.join("debs"))?;
    let _ = fs::remove_dir_all(&dir);
    let tree = dir.join("tree");
    fs::create_dir_all(&tree)?;
    for d in &debs {
        run(Command::new("dpkg-deb").arg("-x").arg(d).arg(&tree))
            .with_context(|| format!("unpacking {}", d.display()))?;
    }
    // bullseye/bookworm packages put modules in /lib/modules, trixie's in /usr/lib/modules.
    let (mods_base, release) = ["lib/modules", "usr/lib/modules"]
        .iter()
        .find_map(|b| {
            let base = tree.join(b);
            let rel = fs::read_dir(&base)
                .ok()?
                .filter_map(|e| e.ok())
                .find_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    e.path().join("kernel").is_dir().then_some(n)
                })?;
            Some((base, rel))
        })
        .with_context(|| format!("no modules directory in {}", tree.display()))?;
    let vmlinuz = [
        tree.join(format!("boot/vmlinuz-{release}")),
        mods_base.join(&release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz for {release} in {}", tree.display()))?;
    fs::rename(&vmlinuz, dir.join("vmlinuz"))?;
    // depmod -b BASE looks in BASE/lib/modules.
    let depmod_base = mods_base.parent().and_then(Path::parent).unwrap();
    crate::ensure_packages(&[("kmod", crate::have("depmod"))])?;
    run(Command::new("/usr/sbin/depmod")
        .arg("-b")
        .arg(depmod_base)
        .arg(&release))
    .context("depmod on the unpacked kernel failed")?;
    let mut c = Cpio::create(&dir.join("modules.cpio"))?;
    c.tree(
        &format!("usr/lib/modules/{release}"),
        &mods_base.join(&release),
    )?;
    c.finish()?;
    fs::remove_dir_all(&tree)?;
    fs::write(&done, &release)?;
    eprintln!("vmtest: kernel {line} ready: {release}");
    prepare(cache, line)
}

/// The main and security archive URIs the host's apt uses (`apt-cache policy`'s package
/// files: label Debian and Debian-Security). The security archive falls back to the main
/// one's conventional sibling.
fn host_archives() -> Result<(String, String)> {
    let policy = capture(Command::new("apt-cache").arg("policy"))?;
    let mut main = None;
    let mut security = None;
    let mut uri: Option<String> = None;
    for l in policy.lines() {
        let t = l.trim();
        if t.starts_with(|c: char| c.is_ascii_digit()) {
            uri = t
                .split_whitespace()
                .nth(1)
                .filter(|u| u.contains("://"))
                .map(str::to_owned);
        } else if let (Some(rel), Some(u)) = (t.strip_prefix("release "), &uri) {
            if !rel.split(',').any(|f| f == "o=Debian") {
                continue;
            }
            if rel.split(',').any(|f| f == "l=Debian-Security") {
                security.get_or_insert(u.clone());
            } else if rel.split(',').any(|f| f == "l=Debian") {
                main.get_or_insert(u.clone());
            }
        }
    }
    let Some(main) = main else {
        bail!("the host's apt has no Debian archive configured (apt-cache policy lists none)")
    };
    let security = security.unwrap_or_else(|| format!("{main}-security"));
    Ok((main, security))
}

/// The host's main Debian archive URI (debootstrap's mirror).
pub fn host_main_archive() -> Result<String> {
    Ok(host_archives()?.0)
}
