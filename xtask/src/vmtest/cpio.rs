//! A writer for the kernel's initramfs format (cpio "newc", `Documentation/driver-api/
//! early-userspace/buffer-format.rst`). Written here rather than driven through cpio(1) so
//! the guest's files get root ownership and the host's device nodes stay out, and so several
//! archives can be concatenated: the kernel unpacks them one after the other into the same
//! root, which lets the large parts (the Debian root, each kernel's modules) be built once
//! and cached, and only the test binaries be packed on each run.

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, BufWriter, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
};

use anyhow::{Context, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

pub struct Cpio {
    out: BufWriter<File>,
    ino: u32,
    /// Directories already written (so `parents` writes each once per archive).
    dirs: HashSet<String>,
}

impl Cpio {
    pub fn create(path: &Path) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            out: BufWriter::with_capacity(1 << 20, f),
            ino: 1,
            dirs: HashSet::new(),
        })
    }

    fn header(&mut self, name: &str, mode: u32, size: u32) -> io::Result<()> {
        self.ino += 1;
        let namesize = name.len() + 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let h = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0
        );
        self.out.write_all(h.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + namesize)
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..n])
    }

    /// A directory (and its parents, each once).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        self.dirs.insert(path.to_owned());
        self.header(path, S_IFDIR | (mode & 0o7777), 0)?;
        Ok(())
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        match path.trim_matches('/').rsplit_once('/') {
            Some((parent, _)) => self.dir(parent, 0o755),
            None => Ok(()),
        }
    }

    pub fn bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.parents(path)?;
        let size = u32::try_from(data.len()).context("file too large for cpio")?;
        self.header(path.trim_matches('/'), S_IFREG | (mode & 0o7777), size)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    /// A host file at `path` in the archive, with the host file's permission bits.
    pub fn file(&mut self, path: &str, host: &Path) -> Result<()> {
        let meta = fs::metadata(host).with_context(|| format!("reading {}", host.display()))?;
        self.parents(path)?;
        let size = u32::try_from(meta.len()).context("file too large for cpio")?;
        self.header(
            path.trim_matches('/'),
            S_IFREG | (meta.mode() & 0o7777),
            size,
        )?;
        let copied = io::copy(&mut File::open(host)?, &mut self.out)?;
        anyhow::ensure!(
            copied == meta.len(),
            "{} changed while archived",
            host.display()
        );
        self.pad(meta.len() as usize)?;
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parents(path)?;
        self.header(path.trim_matches('/'), S_IFLNK | 0o777, target.len() as u32)?;
        self.out.write_all(target.as_bytes())?;
        self.pad(target.len())?;
        Ok(())
    }

    /// Everything under the host directory `host`, placed under `prefix` (sorted, so the same
    /// tree gives the same archive). Device nodes, sockets and fifos are left out: the guest
    /// mounts devtmpfs.
    pub fn tree(&mut self, prefix: &str, host: &Path) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(host)
            .with_context(|| format!("reading {}", host.display()))?
            .collect::<io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_str().context("non-UTF-8 file name")?;
            let path = format!("{}/{name}", prefix.trim_end_matches('/'));
            let ft = e.file_type()?;
            let hp = e.path();
            if ft.is_symlink() {
                let target = fs::read_link(&hp)?;
                self.symlink(&path, target.to_str().context("non-UTF-8 link")?)?;
            } else if ft.is_dir() {
                let mode = fs::metadata(&hp)?.permissions().mode();
                self.dir(&path, mode)?;
                self.tree(&path, &hp)?;
            } else if ft.is_file() {
                self.file(&path, &hp)?;
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.header("TRAILER!!!", 0, 0)?;
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(())
    }
}
