//! Writing to stdout and stderr without panicking when the reader has gone.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe (`drain-user wait --json | head -1`)
//! returns EPIPE, and `println!` panics on it. Every line drain prints goes through here
//! instead: EPIPE becomes a [`Closed`] error, which unwinds the command normally (drops run,
//! so a temporary tracker is still removed) and ends the process quietly with exit 0, as
//! ripgrep does.
//!
//! Except for `wait`, whose exit code is its result (0 means drained): a reader that stops
//! reading (`drain-user wait | head -1 && systemctl stop nginx`) must not turn a drain in
//! progress into a success. `wait` calls [`keep_going_when_closed`]: from then on a closed
//! stream is remembered and skipped, and the command runs to its own outcome.

use std::{
    fmt,
    io::{self, Write},
    sync::atomic::{AtomicBool, Ordering},
};

/// Set by [`keep_going_when_closed`].
static KEEP_GOING: AtomicBool = AtomicBool::new(false);
/// Whether stdout and stderr were found closed while [`KEEP_GOING`] was set.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static STDERR_CLOSED: AtomicBool = AtomicBool::new(false);

/// From now on a closed stdout or stderr is not an error: lines for it are dropped and the
/// command goes on (`wait`, whose exit code must be its outcome).
pub fn keep_going_when_closed() {
    KEEP_GOING.store(true, Ordering::Relaxed);
}

/// The reader of stdout or stderr has gone: not a failure, the command just stops.
#[derive(Debug)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("output closed by its reader")
    }
}

impl std::error::Error for Closed {}

fn write_line(mut w: impl Write, closed: &AtomicBool, args: fmt::Arguments) -> anyhow::Result<()> {
    let keep_going = KEEP_GOING.load(Ordering::Relaxed);
    if keep_going && closed.load(Ordering::Relaxed) {
        return Ok(());
    }
    match writeln!(w, "{args}").and_then(|()| w.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe && keep_going => {
            closed.store(true, Ordering::Relaxed);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Closed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing output")),
    }
}

/// One line on stdout (the command's result).
pub fn out(args: fmt::Arguments) -> anyhow::Result<()> {
    write_line(io::stdout().lock(), &STDOUT_CLOSED, args)
}

/// One line on stderr (warnings and progress).
pub fn err(args: fmt::Arguments) -> anyhow::Result<()> {
    write_line(io::stderr().lock(), &STDERR_CLOSED, args)
}

/// `println!` that returns `Err(Closed)` instead of panicking on EPIPE.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::out(format_args!($($arg)*)) };
}

/// `eprintln!` that returns `Err(Closed)` instead of panicking on EPIPE.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::output::err(format_args!($($arg)*)) };
}

/// True when `e` is (or was caused by) a closed output.
pub fn is_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Closed>())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn broken_pipe_is_closed_not_a_failure() {
        let closed = AtomicBool::new(false);
        let e = write_line(Broken, &closed, format_args!("x")).unwrap_err();
        assert!(is_closed(&e));
        assert!(is_closed(&e.context("printing the status")));
        let mut buf = Vec::new();
        write_line(&mut buf, &closed, format_args!("a {}", 1)).unwrap();
        assert_eq!(buf, b"a 1\n");
    }
}
