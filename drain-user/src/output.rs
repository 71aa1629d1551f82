//! Writing to stdout and stderr without panicking when the reader has gone.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe (`drain-user wait --json | head -1`)
//! returns EPIPE, and `println!` panics on it. Every line drain prints goes through here
//! instead: EPIPE becomes a [`Closed`] error, which unwinds the command normally (drops run,
//! so a temporary tracker is still removed) and ends the process quietly with exit 0, as
//! ripgrep does.

use std::{
    fmt,
    io::{self, Write},
};

/// The reader of stdout or stderr has gone: not a failure, the command just stops.
#[derive(Debug)]
pub struct Closed;

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("output closed by its reader")
    }
}

impl std::error::Error for Closed {}

fn write_line(mut w: impl Write, args: fmt::Arguments) -> anyhow::Result<()> {
    match writeln!(w, "{args}").and_then(|()| w.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(Closed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing output")),
    }
}

/// One line on stdout (the command's result).
pub fn out(args: fmt::Arguments) -> anyhow::Result<()> {
    write_line(io::stdout().lock(), args)
}

/// One line on stderr (warnings and progress).
pub fn err(args: fmt::Arguments) -> anyhow::Result<()> {
    write_line(io::stderr().lock(), args)
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
        let e = write_line(Broken, format_args!("x")).unwrap_err();
        assert!(is_closed(&e));
        assert!(is_closed(&e.context("printing the status")));
        let mut buf = Vec::new();
        write_line(&mut buf, format_args!("a {}", 1)).unwrap();
        assert_eq!(buf, b"a 1\n");
    }
}
