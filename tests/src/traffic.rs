//! Servers and clients that hold, churn and close TCP connections (tracker tests).
//!
//! A [`Server`] is a pool of threads accepting on one listener in namespace `a`; a client
//! (in namespace `b`) tells it what to do with each connection by sending one [`Op`] byte
//! first, and the server answers `k` before acting, so that when the client has read the
//! `k` the connection is known to be accepted. That lets a test open many short
//! connections that end in every way TCP allows (server FIN, server RST, client FIN, client
//! RST) and hold a known number open (ESTABLISHED, or CLOSE_WAIT when the client closes a
//! held one first), then reach quiescent points where the exact number of live
//! connections is known:
//!
//! - every churned connection the server has finished ([`Server::finished`]) has left the
//!   live states on the server side (FIN_WAIT1, LAST_ACK or CLOSE): the server closed it
//!   after reading the op (S, R), or after reading EOF or a reset from the client (C, X);
//! - every held one ([`Server::held`]) is ESTABLISHED or CLOSE_WAIT until the test closes it.
//!
//! File descriptors: the test process holds both ends of a held connection, and the
//! open-files limit (20000) is per process, shared by the tests running in parallel: hold
//! hundreds, not thousands. Churned connections are closed as they go.

use std::{
    fs::File,
    io::{self, ErrorKind, Read, Write},
    mem,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Where `ip netns add` keeps its namespace handles (as in [`crate::netns`]).
const NETNS_DIR: &str = "/var/run/netns";

/// How long a server or client waits for its peer's next byte before giving up: generous,
/// a slow machine must not turn into a hang, only into a failure that says what it was doing.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Moves the calling thread into network namespace `ns` (a name under /var/run/netns):
/// sockets it creates from now on live there.
pub fn enter_netns(ns: &str) {
    let path = format!("{NETNS_DIR}/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: setns on a valid fd; it changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "setns({path}): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `f` on a new thread inside namespace `ns` and returns what it returns (a panic in
/// `f` is re-raised here).
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Which sockets a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// AF_INET on 0.0.0.0.
    V4,
    /// AF_INET6 on [::] with IPV6_V6ONLY=1.
    V6,
    /// AF_INET6 on [::] with IPV6_V6ONLY=0: IPv4 clients arrive as ::ffff:a.b.c.d.
    Dual,
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int, what: &str) {
    // SAFETY: a valid fd and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, what).unwrap_or_else(|e| panic!("{e}"));
}

/// SO_LINGER with a zero timeout: close() then aborts the connection with a RST instead of
/// a FIN (tcp_close: "sk->sk_lingertime == 0 ... tcp_disconnect").
pub fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a struct linger of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    check(rc, "setsockopt(SO_LINGER 0)").unwrap_or_else(|e| panic!("{e}"));
}

/// A `sockaddr_storage` holding `addr`, and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn tcp_socket(family: libc::c_int) -> OwnedFd {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, "socket(SOCK_STREAM)").unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A listening socket on `port` (0: any) in namespace `ns`, with SO_REUSEADDR (as std sets
/// it) and a backlog of 4096.
pub fn listen(ns: &str, stack: Stack, port: u16) -> TcpListener {
    in_netns(ns, || {
        let (family, addr): (_, SocketAddr) = match stack {
            Stack::V4 => (libc::AF_INET, (IpAddr::from([0u8; 4]), port).into()),
            Stack::V6 | Stack::Dual => (libc::AF_INET6, (IpAddr::from([0u8; 16]), port).into()),
        };
        let fd = tcp_socket(family);
        let raw = fd.as_raw_fd();
        set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR");
        if family == libc::AF_INET6 {
            let only = libc::c_int::from(stack == Stack::V6);
            set_int(
                raw,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                only,
                "IPV6_V6ONLY",
            );
        }
        let (sa, len) = sockaddr(addr);
        // SAFETY: a valid fd and a sockaddr of the length passed.
        let rc = unsafe { libc::bind(raw, (&sa as *const libc::sockaddr_storage).cast(), len) };
        check(rc, &format!("bind {addr} in {ns}")).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: a valid, bound fd.
        check(unsafe { libc::listen(raw, 4096) }, "listen").unwrap_or_else(|e| panic!("{e}"));
        TcpListener::from(fd)
    })
}

/// An outbound connection from the calling thread's namespace, with SO_REUSEADDR set before
/// connect (so that a listener with SO_REUSEADDR may later bind the same local port).
pub fn connect_reuseaddr(target: SocketAddr) -> io::Result<TcpStream> {
    let family = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = tcp_socket(family);
    set_int(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        1,
        "SO_REUSEADDR",
    );
    let (sa, len) = sockaddr(target);
    // SAFETY: a valid fd and a sockaddr of the length passed; a blocking connect.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    check(rc, &format!("connect {target}"))?;
    Ok(TcpStream::from(fd))
}

/// What the server does with a connection; the client sends it as the first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// The server closes first (FIN): server side ESTABLISHED -> FIN_WAIT1.
    ServerClose,
    /// The server aborts (SO_LINGER 0, RST): server side ESTABLISHED -> CLOSE.
    ServerReset,
    /// The client closes first: server side ESTABLISHED -> CLOSE_WAIT, and after the server
    /// reads EOF and closes, CLOSE_WAIT -> LAST_ACK.
    ClientClose,
    /// The client aborts with a RST: server side ESTABLISHED -> CLOSE.
    ClientReset,
    /// The server keeps the connection until the test closes it ([`Server::close_held`]).
    Hold,
}

impl Op {
    /// The four ways a churned connection can end.
    pub const ENDINGS: [Op; 4] = [
        Op::ServerClose,
        Op::ServerReset,
        Op::ClientClose,
        Op::ClientReset,
    ];

    fn byte(self) -> u8 {
        match self {
            Op::ServerClose => b'S',
            Op::ServerReset => b'R',
            Op::ClientClose => b'C',
            Op::ClientReset => b'X',
            Op::Hold => b'H',
        }
    }
}

/// How the server closes a held connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    Fin,
    Rst,
}

#[derive(Default)]
struct Shared {
    held: Mutex<Vec<TcpStream>>,
    finished: AtomicU64,
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
}

/// A pool of threads accepting on one listener and serving the [`Op`] protocol.
pub struct Server {
    /// The listener's local address (port included).
    pub addr: SocketAddr,
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Serves `listener` (made with [`listen`], in the server's namespace) with `workers`
    /// threads. The threads need not be in the namespace: accepted sockets live where the
    /// listener lives.
    pub fn start(listener: TcpListener, workers: usize) -> Self {
        let addr = listener.local_addr().expect("listener address");
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared::default());
        let workers = (0..workers)
            .map(|i| {
                let (l, sh) = (listener.clone(), shared.clone());
                thread::Builder::new()
                    .name(format!("server-{}-{i}", addr.port()))
                    .spawn(move || worker(&l, &sh))
                    .expect("spawning a server thread")
            })
            .collect();
        Server {
            addr,
            listener,
            shared,
            workers,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Connections the server has closed after serving their op (held ones not included).
    pub fn finished(&self) -> u64 {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Connections held open right now.
    pub fn held(&self) -> usize {
        self.shared.held.lock().unwrap().len()
    }

    /// Waits until the server has finished `n` connections in all; panics after `timeout`
    /// saying how far it got.
    pub fn wait_finished(&self, n: u64, timeout: Duration) {
        self.poll(
            timeout,
            || self.finished() >= n,
            || format!("finished {} of {n} connections", self.finished()),
        );
    }

    /// Waits until `n` connections are held.
    pub fn wait_held(&self, n: usize, timeout: Duration) {
        self.poll(
            timeout,
            || self.held() == n,
            || format!("holds {} connections, expected {n}", self.held()),
        );
    }

    /// Polls `done` every 2 ms, checking for server errors; panics with `what()` after
    /// `timeout`.
    fn poll(&self, timeout: Duration, done: impl Fn() -> bool, what: impl Fn() -> String) {
        let t0 = Instant::now();
        while !done() {
            self.assert_no_errors();
            assert!(
                t0.elapsed() < timeout,
                "server on :{} {} (after {timeout:?})",
                self.port(),
                what()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Closes the `n` oldest held connections the way `how` says; returns their peers.
    pub fn close_held(&self, n: usize, how: Close) -> Vec<SocketAddr> {
        let closing: Vec<TcpStream> = {
            let mut held = self.shared.held.lock().unwrap();
            assert!(
                n <= held.len(),
                "closing {n} of {} held connections",
                held.len()
            );
            held.drain(..n).collect()
        };
        close_all(closing, how)
    }

    /// Closes the `n` newest held connections the way `how` says; returns their peers.
    pub fn close_newest(&self, n: usize, how: Close) -> Vec<SocketAddr> {
        let closing: Vec<TcpStream> = {
            let mut held = self.shared.held.lock().unwrap();
            assert!(
                n <= held.len(),
                "closing {n} of {} held connections",
                held.len()
            );
            let keep = held.len() - n;
            held.split_off(keep)
        };
        close_all(closing, how)
    }

    /// Takes the held connections out of the server (to read and write on them).
    pub fn take_held(&self) -> Vec<TcpStream> {
        mem::take(&mut *self.shared.held.lock().unwrap())
    }

    /// Takes the held connections out of the server, as the server ends of `clients`, in
    /// their order (server threads may have pushed them in another order). Panics if one
    /// is missing.
    pub fn take_held_for(&self, clients: &[TcpStream]) -> Vec<TcpStream> {
        let mut taken = self.take_held();
        clients
            .iter()
            .map(|c| {
                let me = c.local_addr().expect("client address");
                let i = taken
                    .iter()
                    .position(|s| s.peer_addr().ok() == Some(me))
                    .unwrap_or_else(|| panic!("the server holds no connection from {me}"));
                taken.remove(i)
            })
            .collect()
    }

    /// Panics with what went wrong in the server threads, if anything did.
    pub fn assert_no_errors(&self) {
        let errors = self.shared.errors.lock().unwrap();
        assert!(
            errors.is_empty(),
            "server on :{}: {} error(s), first: {:?}",
            self.port(),
            errors.len(),
            &errors[..errors.len().min(5)]
        );
    }

    /// Stops listening (the listener leaves LISTEN, as when a server shutting down
    /// gracefully closes its listening socket) and joins the threads; held connections stay.
    pub fn stop_listening(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket disconnects it (inet_shutdown -> tcp_disconnect),
        // which wakes every thread blocked in accept() with EINVAL.
        // SAFETY: a valid listening fd.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    /// Stops accepting, joins the threads and closes the listener and every held connection.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop_listening();
        self.shared.held.lock().unwrap().clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn close_all(streams: Vec<TcpStream>, how: Close) -> Vec<SocketAddr> {
    streams
        .into_iter()
        .map(|s| {
            let peer = s.peer_addr().unwrap_or_else(|_| ([0u8; 4], 0).into());
            if how == Close::Rst {
                set_linger_zero(&s);
            }
            peer
        })
        .collect()
}

fn worker(listener: &TcpListener, sh: &Shared) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if sh.stop.load(Ordering::SeqCst) => return,
            Err(e) => {
                sh.errors.lock().unwrap().push(format!("accept: {e}"));
                if e.raw_os_error() == Some(libc::EINVAL) {
                    return; // the listener is gone
                }
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if let Err(e) = serve(stream, sh) {
            sh.errors.lock().unwrap().push(e);
        }
    }
}

fn serve(mut s: TcpStream, sh: &Shared) -> Result<(), String> {
    let peer = s.peer_addr().map_or("?".into(), |p| p.to_string());
    let ctx = |what: &str, e: io::Error| format!("{what} ({peer}): {e}");
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| ctx("timeout", e))?;
    let mut op = [0u8];
    s.read_exact(&mut op)
        .map_err(|e| ctx("reading the op", e))?;
    s.write_all(b"k").map_err(|e| ctx("answering", e))?;
    match op[0] {
        b'H' => {
            sh.held.lock().unwrap().push(s);
            return Ok(());
        }
        b'S' => drop(s),
        b'R' => {
            set_linger_zero(&s);
            drop(s);
        }
        b'C' | b'X' => {
            // Until EOF (client FIN) or an error (client RST); then close.
            let mut buf = [0u8; 64];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(ctx("waiting for the client to close", e)),
                }
            }
        }
        other => return Err(format!("unknown op {other:#x} from {peer}")),
    }
    sh.finished.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Opens one connection from the calling thread's namespace and plays `op` on it; returns
/// the client's stream for [`Op::Hold`], `None` for the others (closed by then on the
/// client side).
pub fn run_op(target: SocketAddr, op: Op) -> Result<Option<TcpStream>, String> {
    let mut s = TcpStream::connect_timeout(&target, IO_TIMEOUT)
        .map_err(|e| format!("connect {target}: {e}"))?;
    let ctx = |what: &str, e: io::Error| format!("{what} ({op:?} to {target}): {e}");
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| ctx("timeout", e))?;
    s.write_all(&[op.byte()])
        .map_err(|e| ctx("sending op", e))?;
    let mut k = [0u8];
    match op {
        Op::ServerClose | Op::ServerReset => {
            // "k" then EOF or a reset: either way the server is done with it.
            let mut buf = [0u8; 16];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                    Err(e) => return Err(ctx("waiting for the server to close", e)),
                }
            }
            Ok(None)
        }
        Op::ClientClose => {
            s.read_exact(&mut k).map_err(|e| ctx("reading k", e))?;
            drop(s);
            Ok(None)
        }
        Op::ClientReset => {
            s.read_exact(&mut k).map_err(|e| ctx("reading k", e))?;
            set_linger_zero(&s);
            drop(s);
            Ok(None)
        }
        Op::Hold => {
            s.read_exact(&mut k).map_err(|e| ctx("reading k", e))?;
            Ok(Some(s))
        }
    }
}

/// Opens `n` connections from namespace `ns` to `target` and has the server hold them;
/// returns the client ends. Dropping one of them (client FIN) leaves the server's end in
/// CLOSE_WAIT, which is still live.
pub fn open_held(ns: &str, target: SocketAddr, n: usize) -> Vec<TcpStream> {
    in_netns(ns, || {
        (0..n)
            .map(|i| {
                run_op(target, Op::Hold)
                    .unwrap_or_else(|e| panic!("held connection {i}: {e}"))
                    .expect("a held stream")
            })
            .collect()
    })
}

/// What a churn run did.
#[derive(Clone, Debug, Default)]
pub struct Churned {
    /// Connections opened and closed.
    pub connections: u64,
    /// How many ended each way, in the order of the endings asked for.
    pub by_ending: Vec<(Op, u64)>,
    pub elapsed: Duration,
}

impl Churned {
    /// Adds another run's numbers to these.
    pub fn add(&mut self, other: &Churned) {
        self.connections += other.connections;
        self.elapsed += other.elapsed;
        for &(op, n) in &other.by_ending {
            match self.by_ending.iter_mut().find(|(o, _)| *o == op) {
                Some((_, t)) => *t += n,
                None => self.by_ending.push((op, n)),
            }
        }
    }
}

/// Opens and closes `n` connections from namespace `ns` with `threads` client threads:
/// connection i goes to `targets[i % targets.len()]` and ends the way
/// `endings[(i / targets.len()) % endings.len()]` says, so every target sees every ending
/// ([`Op::ENDINGS`]: all four). Panics with the first failures if any connection failed.
pub fn churn(ns: &str, targets: &[SocketAddr], endings: &[Op], n: u64, threads: usize) -> Churned {
    assert!(!targets.is_empty() && !endings.is_empty() && threads > 0);
    assert!(!endings.contains(&Op::Hold), "churned connections must end");
    let next = AtomicU64::new(0);
    let by_ending: Vec<AtomicU64> = endings.iter().map(|_| AtomicU64::new(0)).collect();
    let errors: Mutex<Vec<String>> = Mutex::default();
    let failed = AtomicUsize::new(0);
    let t0 = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                enter_netns(ns);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || failed.load(Ordering::Relaxed) > 10 {
                        return;
                    }
                    let t = targets.len() as u64;
                    let target = targets[(i % t) as usize];
                    let e = ((i / t) % endings.len() as u64) as usize;
                    match run_op(target, endings[e]) {
                        Ok(_) => {
                            by_ending[e].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("connection {i}: {err}"));
                        }
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap();
    assert!(
        errors.is_empty(),
        "churn from {ns}: {} connection(s) failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let by_ending: Vec<(Op, u64)> = endings
        .iter()
        .zip(by_ending)
        .map(|(&op, c)| (op, c.into_inner()))
        .collect();
    Churned {
        connections: by_ending.iter().map(|(_, n)| n).sum(),
        by_ending,
        elapsed: t0.elapsed(),
    }
}

/// Sockets in namespace `ns` whose local port is `port`, in one `ss` state filter
/// (`established`, `close-wait`, ...): one `ss -Htn` line each.
pub fn ss_lines(ns: &str, state: &str, port: u16) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={NETNS_DIR}/{ns}"))
        .args(["ss", "-Htn", "state", state])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("running ss");
    assert!(
        out.status.success(),
        "ss in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// What `ss` says is live on local port `port` in `ns`: (ESTABLISHED, CLOSE_WAIT).
pub fn ss_live(ns: &str, port: u16) -> (usize, usize) {
    (
        ss_lines(ns, "established", port).len(),
        ss_lines(ns, "close-wait", port).len(),
    )
}
