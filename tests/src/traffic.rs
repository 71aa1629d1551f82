//! Real TCP in the test namespaces: connects with their outcome spelled out, listeners, an
//! echo server, connections whose both ends the test holds, the churn server, raw sockets,
//! and `ss`.
//!
//! - [`connect`], [`connect_from`], [`connect_with_opts`], [`probe_all`], [`probe_all_from`]:
//!   a connect from a namespace (optionally from a chosen source address, with socket
//!   options), as a [`Connect`] (ok, refused and how fast, timed out); several at once so
//!   their timeouts overlap.
//! - [`bind`], [`listen`], [`accept_queued`], [`EchoServer`], [`round_trip`], [`tcp_pair`],
//!   [`transfer`], [`exchange`]: listeners and data that must arrive intact.
//! - [`Server`], [`Op`], [`churn`], [`open_held`]: the churn protocol (below).
//! - [`set_linger_zero`], [`connect_reuseaddr`], [`packet_socket`], [`packet_send`],
//!   [`packet_recv`]: socket options and raw sockets std does not offer.
//! - [`ss_lines`], [`ss_live`]: what `ss` sees.
//!
//! The churn [`Server`] is a pool of threads accepting on one listener in namespace `a`; a
//! client (in namespace `b`) tells it what to do with each connection by sending one [`Op`]
//! byte first, and the server answers `k` before acting, so that when the client has read
//! the `k` the connection is known to be accepted. That lets a test open many short
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
    fmt,
    io::{self, ErrorKind, Read, Write},
    mem,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::{enter_netns, in_netns, nsenter, NetNsPair};

/// How long a peer waits for the other side's next byte before giving up: generous, a slow
/// machine must not turn into a hang, only into a failure that says what it was doing.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Connects
// ---------------------------------------------------------------------------------------

/// How a connect ended.
pub enum Connect {
    /// Established; the stream is blocking, with read and write timeouts set.
    Ok(TcpStream),
    /// RST in answer to the SYN, this long after connect() was called.
    Refused(Duration),
    /// No answer within the timeout (the SYN, or every answer, was dropped).
    TimedOut,
    Failed(io::Error),
}

impl Connect {
    pub fn is_ok(&self) -> bool {
        matches!(self, Connect::Ok(_))
    }

    pub fn is_timed_out(&self) -> bool {
        matches!(self, Connect::TimedOut)
    }

    /// The stream of a connect that succeeded; panics otherwise.
    #[track_caller]
    pub fn stream(self, what: &str) -> TcpStream {
        match self {
            Connect::Ok(s) => s,
            other => panic!("{what}: expected the connect to succeed, got {other:?}"),
        }
    }
}

impl fmt::Debug for Connect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Connect::Ok(s) => write!(f, "connected ({:?})", s.local_addr().ok()),
            Connect::Refused(t) => write!(f, "ECONNREFUSED after {t:?}"),
            Connect::TimedOut => f.write_str("timed out"),
            Connect::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Connects from namespace `ns` to `to`, waiting at most `timeout`.
pub fn connect(pair: &NetNsPair, ns: &str, to: SocketAddr, timeout: Duration) -> Connect {
    connect_from(pair, ns, None, to, timeout)
}

/// Connects from namespace `ns` to `to`, from source address `from` when given (std's
/// TcpStream cannot bind before connecting), waiting at most `timeout`.
pub fn connect_from(
    pair: &NetNsPair,
    ns: &str,
    from: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> Connect {
    connect_with_opts(pair, ns, from, to, &[], timeout)
}

/// A socket option set before connecting: (level, name, value bytes), e.g. IP_OPTIONS, so
/// the SYN carries IPv4 options, or IPV6_DSTOPTS for an IPv6 extension header.
pub type SockOpt<'a> = (libc::c_int, libc::c_int, &'a [u8]);

/// [`connect_from`] with socket options set on the socket first.
pub fn connect_with_opts(
    pair: &NetNsPair,
    ns: &str,
    from: Option<IpAddr>,
    to: SocketAddr,
    opts: &[SockOpt<'_>],
    timeout: Duration,
) -> Connect {
    pair.in_ns(ns, || {
        let sock = tcp_socket(family(to), libc::SOCK_NONBLOCK);
        for &(level, name, value) in opts {
            // SAFETY: a valid fd and an option value of the length passed.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    level,
                    name,
                    value.as_ptr().cast(),
                    value.len() as libc::socklen_t,
                )
            };
            check(rc, &format!("setsockopt({level}, {name}) in {ns}"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if let Some(src) = from {
            let (sa, len) = sockaddr(SocketAddr::new(src, 0));
            // SAFETY: a valid fd and a sockaddr of the length passed.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&sa as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            check(rc, &format!("bind {src} in {ns}")).unwrap_or_else(|e| panic!("{e}"));
        }
        let start = Instant::now();
        match nonblocking_connect(&sock, to, timeout) {
            Ok(true) => {
                let s = TcpStream::from(sock);
                s.set_nonblocking(false).expect("blocking stream");
                s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
                s.set_write_timeout(Some(IO_TIMEOUT))
                    .expect("write timeout");
                Connect::Ok(s)
            }
            Ok(false) => Connect::TimedOut,
            Err(e) => match e.kind() {
                ErrorKind::ConnectionRefused => Connect::Refused(start.elapsed()),
                ErrorKind::TimedOut => Connect::TimedOut,
                _ => Connect::Failed(e),
            },
        }
    })
}

/// connect() on a non-blocking socket, then poll for the outcome: Ok(true) connected,
/// Ok(false) no outcome within `timeout`, Err the connect's error.
fn nonblocking_connect(sock: &OwnedFd, to: SocketAddr, timeout: Duration) -> io::Result<bool> {
    let (sa, len) = sockaddr(to);
    let start = Instant::now();
    // SAFETY: a valid fd and a sockaddr of the length passed.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut err: libc::c_int = 0;
        let mut l = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: err and l are valid out pointers of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut l,
            )
        };
        check(rc, "getsockopt(SO_ERROR)")?;
        return match err {
            0 => Ok(true),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
}

/// Connects from `ns` to every address at once (so timeouts overlap instead of adding up)
/// and returns the outcomes in order.
pub fn probe_all(
    pair: &NetNsPair,
    ns: &str,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Vec<Connect> {
    let probes: Vec<_> = targets.iter().map(|&t| (None, t)).collect();
    probe_all_from(pair, ns, &probes, timeout)
}

/// [`probe_all`] with a source address per connect (see [`connect_from`]).
pub fn probe_all_from(
    pair: &NetNsPair,
    ns: &str,
    probes: &[(Option<IpAddr>, SocketAddr)],
    timeout: Duration,
) -> Vec<Connect> {
    thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|&(from, to)| s.spawn(move || connect_from(pair, ns, from, to, timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

// ---------------------------------------------------------------------------------------
// Listeners, echo, data
// ---------------------------------------------------------------------------------------

/// A listener bound at `addr` inside namespace `ns` (accept works from any thread).
pub fn bind(pair: &NetNsPair, ns: &str, addr: SocketAddr) -> TcpListener {
    pair.in_ns(ns, || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr} in {ns}: {e}"))
    })
}

/// Accepts (and closes) whatever is queued on `l` without waiting; returns how many. For
/// emptying a queue; to count what a connect delivered, use [`accept_queued`].
pub fn accept_pending(l: &TcpListener) -> usize {
    l.set_nonblocking(true).expect("nonblocking listener");
    let mut n = 0;
    loop {
        match l.accept() {
            Ok(_) => n += 1,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return n,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Accepts (and closes) whatever is queued on `l`, until nothing more has arrived for a
/// quiet spell (100 ms, scaled under emulation); returns how many. A connect completes on
/// the client at the SYN-ACK, but the server's side joins the accept queue only once the
/// final ACK has been processed: under TCG that came after a count that did not wait.
pub fn accept_queued(l: &TcpListener) -> usize {
    l.set_nonblocking(true).expect("nonblocking listener");
    let quiet = Duration::from_millis(100) * crate::cli::slowdown();
    let mut n = 0;
    let mut last = Instant::now();
    loop {
        match l.accept() {
            Ok(_) => {
                n += 1;
                last = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if last.elapsed() >= quiet {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A TCP echo server on a listener bound inside a namespace; it accepts on a thread of its
/// own (accept needs no namespace) and echoes each connection on another. Dropping it
/// stops accepting and closes the listener.
pub struct EchoServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Binds `addr` inside `ns` (port 0 picks a free one: see `self.addr`).
    pub fn start(pair: &NetNsPair, ns: &str, addr: SocketAddr) -> Self {
        let listener = bind(pair, ns, addr);
        let addr = listener.local_addr().expect("local_addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            thread::spawn(move || echo(s));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(e) => {
                            eprintln!("echo server {addr}: accept: {e}");
                            thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
        };
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo(s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = [0u8; 16 * 1024];
    let mut s = s;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends `len` patterned bytes through an echo server on `stream` and checks that the same
/// bytes come back.
#[track_caller]
pub fn round_trip(stream: &TcpStream, len: usize, seed: u8) {
    transfer(stream, stream, len, seed);
}

/// Connects from `client_ns` to `listener` and accepts: (client end, server end), a
/// connection whose both ends the test holds.
#[track_caller]
pub fn tcp_pair(
    pair: &NetNsPair,
    listener: &TcpListener,
    client_ns: &str,
) -> (TcpStream, TcpStream) {
    let to = listener.local_addr().expect("local_addr");
    let client = connect(pair, client_ns, to, Duration::from_secs(5))
        .stream(&format!("connecting from {client_ns} to {to}"));
    let (srv, _) = listener.accept().expect("accept");
    srv.set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    srv.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    (client, srv)
}

/// Sends `len` patterned bytes each way on every connection at once (client to server
/// seeded with `seed`, the other way with `!seed`), checked on arrival.
pub fn exchange(conns: &[(TcpStream, TcpStream)], seed: u8, len: usize) {
    thread::scope(|s| {
        for (client, server) in conns {
            s.spawn(move || transfer(client, server, len, seed));
            s.spawn(move || transfer(server, client, len, !seed));
        }
    });
}

/// Sends `len` patterned bytes from `from` to `to` and checks them on arrival (a writer
/// thread, so large payloads cannot deadlock on full buffers); both directions of a
/// connection can run at once (call it from two threads), and `from` and `to` may be one
/// stream to an echo server.
#[track_caller]
pub fn transfer(from: &TcpStream, to: &TcpStream, len: usize, seed: u8) {
    let data = pattern(len, seed);
    thread::scope(|s| {
        let writer = s.spawn(|| (&*from).write_all(&data));
        let mut got = vec![0u8; len];
        let read = (&*to).read_exact(&mut got);
        let wrote = writer.join().expect("writer thread");
        wrote.unwrap_or_else(|e| panic!("sending {len} bytes: {e}"));
        read.unwrap_or_else(|e| panic!("receiving {len} bytes: {e}"));
        assert!(got == data, "{len} bytes arrived altered");
    });
}

/// Bytes that differ from position to position, so a lost or reordered chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Raw sockets and socket options
// ---------------------------------------------------------------------------------------

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

/// setsockopt with an option value of type `T`; panics naming `what` on failure.
fn set_opt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: &T, what: &str) {
    // SAFETY: a valid fd and an option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (v as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    check(rc, what).unwrap_or_else(|e| panic!("{e}"));
}

fn set_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int, what: &str) {
    set_opt(fd, level, opt, &v, what);
}

/// SO_LINGER with a zero timeout: close() then aborts the connection with a RST instead of
/// a FIN (tcp_close: "sk->sk_lingertime == 0 ... tcp_disconnect").
pub fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_opt(
        s.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &l,
        "setsockopt(SO_LINGER 0)",
    );
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

fn family(addr: SocketAddr) -> libc::c_int {
    if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// A TCP socket of `family`, with `flags` (e.g. SOCK_NONBLOCK) besides SOCK_CLOEXEC.
fn tcp_socket(family: libc::c_int, flags: libc::c_int) -> OwnedFd {
    // SAFETY: plain socket(2); the fd is owned from here on.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags, 0) };
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
        let fd = tcp_socket(family, 0);
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
    let fd = tcp_socket(family(target), 0);
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

/// A raw AF_PACKET socket bound to `ifindex` of the calling thread's namespace. `rx`:
/// receives the IPv4 frames arriving on the interface (PACKET_IGNORE_OUTGOING, a 4 MiB
/// buffer, 50 ms receive timeout); otherwise a send-only socket (protocol 0 receives
/// nothing).
pub fn packet_socket(ifindex: u32, rx: bool) -> OwnedFd {
    let proto: u16 = if rx { crate::frames::ETH_P_IPV4 } else { 0 };
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto.to_be()),
        )
    };
    check(fd, "AF_PACKET socket").unwrap_or_else(|e| panic!("{e}"));
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc, "bind AF_PACKET").unwrap_or_else(|e| panic!("{e}"));
    if rx {
        let raw = sock.as_raw_fd();
        set_int(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            1,
            "PACKET_IGNORE_OUTGOING",
        );
        set_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20, "SO_RCVBUF");
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        set_opt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, "SO_RCVTIMEO");
    }
    sock
}

/// Sends one Ethernet frame out of `ifindex` on a socket from [`packet_socket`]; true when
/// the whole frame went.
pub fn packet_send(sock: &OwnedFd, ifindex: u32, frame: &[u8]) -> bool {
    // SAFETY: sockaddr_ll is plain data.
    let mut to: libc::sockaddr_ll = unsafe { mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = crate::frames::ETH_P_IPV4.to_be();
    to.sll_ifindex = ifindex as i32;
    // SAFETY: frame and `to` are valid for the lengths given.
    let r = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    r == frame.len() as isize
}

/// The next frame a receiving [`packet_socket`] got, in `buf`: its length, or None after
/// the socket's 50 ms receive timeout.
pub fn packet_recv(sock: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: buf is a valid buffer of the length given.
    let r = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(r).ok()
}

// ---------------------------------------------------------------------------------------
// The churn server
// ---------------------------------------------------------------------------------------

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
    /// Accepted connections that ended without sending their op: "peer: why".
    unserved: Mutex<Vec<String>>,
    /// Whether those are expected ([`Server::expect_unserved`]) rather than errors.
    unserved_expected: AtomicBool,
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
        self.close_some(n, how, false)
    }

    /// Closes the `n` newest held connections the way `how` says; returns their peers.
    pub fn close_newest(&self, n: usize, how: Close) -> Vec<SocketAddr> {
        self.close_some(n, how, true)
    }

    fn close_some(&self, n: usize, how: Close, newest: bool) -> Vec<SocketAddr> {
        let closing: Vec<TcpStream> = {
            let mut held = self.shared.held.lock().unwrap();
            assert!(
                n <= held.len(),
                "closing {n} of {} held connections",
                held.len()
            );
            if newest {
                let keep = held.len() - n;
                held.split_off(keep)
            } else {
                held.drain(..n).collect()
            }
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

    /// Under SYN cookies a stray ACK can make the listener create a connection that no
    /// client holds (see the tracker's cookie phase): the server accepts it and waits for an
    /// op that never comes. From now on such connections are counted ([`Server::unserved`])
    /// instead of failing [`Server::assert_no_errors`].
    pub fn expect_unserved(&self) {
        self.shared.unserved_expected.store(true, Ordering::SeqCst);
    }

    /// The accepted connections that ended (EOF, reset, or the 20 s I/O timeout) before their
    /// op arrived, as "peer: why".
    pub fn unserved(&self) -> Vec<String> {
        self.shared.unserved.lock().unwrap().clone()
    }

    /// Panics with what went wrong in the server threads, if anything did.
    pub fn assert_no_errors(&self) {
        if !self.shared.unserved_expected.load(Ordering::SeqCst) {
            let unserved = self.shared.unserved.lock().unwrap();
            assert!(
                unserved.is_empty(),
                "server on :{}: {} accepted connection(s) ended without an op, first: {:?}",
                self.port(),
                unserved.len(),
                &unserved[..unserved.len().min(5)]
            );
        }
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
    if let Err(e) = s.read_exact(&mut op) {
        sh.unserved.lock().unwrap().push(format!("{peer}: {e}"));
        return Ok(());
    }
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
            // Until EOF (client FIN) or a reset (client RST); then close.
            read_until_closed(&mut s).map_err(|e| ctx("waiting for the client to close", e))?;
        }
        other => return Err(format!("unknown op {other:#x} from {peer}")),
    }
    sh.finished.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Reads (and discards) until the peer closes: EOF after its FIN, or its RST.
fn read_until_closed(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
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
            read_until_closed(&mut s).map_err(|e| ctx("waiting for the server to close", e))?;
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

// ---------------------------------------------------------------------------------------
// ss
// ---------------------------------------------------------------------------------------

/// Sockets in namespace `ns` whose local port is `port`, in one `ss` state filter
/// (`established`, `close-wait`, ...): one `ss -Htn` line each.
pub fn ss_lines(ns: &str, state: &str, port: u16) -> Vec<String> {
    let out = nsenter(ns, "ss")
        .args(["-Htn", "state", state])
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

/// Sends one SYN from `from` (port 0: an ephemeral one) to `to` with a non-blocking
/// connect in the calling thread's namespace, without waiting for an answer. The socket
/// stays in SYN_SENT (and retransmits after ~1 s) until the returned fd is dropped.
pub fn send_syn(from: SocketAddr, to: SocketAddr) -> OwnedFd {
    let fd = tcp_socket(family(to), libc::SOCK_NONBLOCK);
    let (sa, len) = sockaddr(from);
    // SAFETY: a valid fd and a sockaddr of the length passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    check(rc, &format!("bind {from}")).unwrap_or_else(|e| panic!("{e}"));
    let (sa, len) = sockaddr(to);
    // SAFETY: as above; non-blocking, so this returns EINPROGRESS once the SYN is out.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EINPROGRESS),
            "connect {to}: {e}"
        );
    }
    fd
}
