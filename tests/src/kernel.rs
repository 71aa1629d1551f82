//! What a test needs from the kernel, declared in one place: `require!(Feature::Tcx)` at the
//! top of a test that cannot apply without it.
//!
//! Each feature is probed by trying it (a query on a hook, a socket option), never by
//! comparing version numbers: distributions backport. Where the feature is missing:
//! - under `cargo xtask vmtest` (its guest runner sets `DRAIN_TEST_MISSING_FEATURE=skip`)
//!   the test prints one `drain-tests: NOT RUN: <reason>` line and returns, and the matrix
//!   counts it as not run (never as passed);
//! - anywhere else (`cargo xtask test` on the host's own kernel, which CI expects to have everything) the
//!   test fails: nothing is skipped silently on the host.
//!
//! Keep the list honest: a feature belongs here only when a kernel of the matrix truly cannot
//! have it, not because drain has a bug there.

use std::io;

use aya::programs::{tc::TcAttachType, SchedClassifier};

#[derive(Clone, Copy, Debug)]
pub enum Feature {
    /// TCX links (BPF_TCX_INGRESS; Linux 6.6): tests that assert a TCX chain specifically.
    Tcx,
}

impl Feature {
    /// `Ok` when the running kernel has the feature, else why not.
    pub fn probe(self) -> Result<(), String> {
        match self {
            Self::Tcx => SchedClassifier::query_tcx("lo", TcAttachType::Ingress)
                .map(drop)
                .map_err(|e| {
                    format!("no TCX (Linux 6.6+): querying lo's tcx_ingress hook failed: {e}")
                }),
        }
    }
}

/// Whether the running kernel charges BPF maps to RLIMIT_MEMLOCK (kernels before 5.11 do;
/// later ones charge the memory cgroup), found by trying, not from the version: a child
/// process lowers its memlock limit to 0 and creates a one-entry array map, which fails
/// with EPERM only where maps are charged to the limit. Needs root (CAP_BPF).
pub fn maps_charged_to_memlock() -> bool {
    // SAFETY: the child makes raw system calls only (no allocation, no lock: the test
    // process has other threads) and ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // union bpf_attr for BPF_MAP_CREATE: map_type ARRAY (2), key 4, value 8, 1 entry.
        let attr: [u32; 32] = {
            let mut a = [0u32; 32];
            a[0] = 2;
            a[1] = 4;
            a[2] = 8;
            a[3] = 1;
            a
        };
        // SAFETY: a valid rlimit, then bpf(BPF_MAP_CREATE) with an attr of the size given.
        let code = unsafe {
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &zero) != 0 {
                3
            } else if libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), 128) >= 0 {
                0
            } else if *libc::__errno_location() == libc::EPERM {
                1
            } else {
                2
            }
        };
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child made above.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", io::Error::last_os_error());
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => false,
        (true, 1) => true,
        other => panic!("the memlock probe (a map under a limit of 0) ended with {other:?}"),
    }
}

/// The environment variable the guest runner of `cargo xtask vmtest` sets.
pub const MISSING_FEATURE_ENV: &str = "DRAIN_TEST_MISSING_FEATURE";

/// Whether the running kernel has the feature, for a test that checks a different outcome
/// on kernels without it (`check` reporting TCX missing on 6.1) rather than not running.
pub fn has(feature: Feature) -> bool {
    feature.probe().is_ok()
}

/// Whether the test may go on (see the module comment); use [`require!`](crate::require).
pub fn require(feature: Feature) -> bool {
    decide(
        feature,
        feature.probe(),
        std::env::var(MISSING_FEATURE_ENV).ok().as_deref(),
    )
}

/// [`require`]'s decision, given the probe's result and the environment variable's value.
fn decide(feature: Feature, probe: Result<(), String>, mode: Option<&str>) -> bool {
    let Err(why) = probe else {
        return true;
    };
    if mode == Some("skip") {
        let release = uname_release().unwrap_or_else(|e| format!("? ({e})"));
        println!("drain-tests: NOT RUN: kernel {release}: {why}");
        return false;
    }
    panic!(
        "this test needs {feature:?} and the kernel lacks it: {why}. Outside the kernel \
         matrix (`cargo xtask vmtest`, which reports such a test as not run) every feature \
         must be present"
    );
}

/// Returns from the calling test (after one `NOT RUN` line) when the kernel lacks one of
/// the features and the run is the kernel matrix's; fails it anywhere else.
#[macro_export]
macro_rules! require {
    ($($feature:expr),+ $(,)?) => {
        $(
            if !$crate::kernel::require($feature) {
                return;
            }
        )+
    };
}

fn uname_release() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::{decide, Feature};

    #[test]
    fn a_present_feature_lets_the_test_run() {
        assert!(decide(Feature::Tcx, Ok(()), None));
        assert!(decide(Feature::Tcx, Ok(()), Some("skip")));
    }

    #[test]
    fn a_missing_feature_is_not_run_in_the_matrix() {
        assert!(!decide(Feature::Tcx, Err("gone".into()), Some("skip")));
    }

    #[test]
    #[should_panic(expected = "needs Tcx and the kernel lacks it: gone")]
    fn a_missing_feature_fails_the_test_anywhere_else() {
        decide(Feature::Tcx, Err("gone".into()), None);
    }
}
