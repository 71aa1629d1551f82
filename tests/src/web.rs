//! A real web stack for end-to-end tests: Debian's nginx as the servers, HAProxy as the
//! balancer in front of them (HTTP health checks, pooled keep-alive connections to the
//! backends, retries with redispatch) and wrk as the load, each run inside a namespace the
//! test made (`nsenter --net`, so drain-user sees the host's bpffs).
//!
//! Every daemon runs in a process group of its own and is killed as a group on drop (nginx
//! forks its workers; a daemonized nginx started by somebody else is killed through its pid
//! file). Files live in a [`TempDir`] removed on drop.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::{net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// `nsenter --net=/var/run/netns/<ns> <program>`: the network namespace only, so the
/// program keeps the host's mount namespace and with it /sys/fs/bpf (`ip netns exec` would
/// remount /sys and hide every pin).
pub fn ns_cmd(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}")).arg(program);
    c
}

/// Runs `cmd`, panicking with its output unless it exits 0; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A directory under the system temp dir, removed (with everything in it) on drop. Short
/// paths on purpose: ssh control sockets inside it must fit in sun_path (108 bytes).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let (_, _, suffix) = crate::unique_suffix();
        let p = std::env::temp_dir().join(format!("drain-{tag}-{suffix}"));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// Sends `sig` to process group `pgid`; a group that is gone already is fine.
pub fn kill_group(pgid: i32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill has no memory-safety preconditions; a negative pid names a group.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// A foreground process started in a process group of its own, its stdout and stderr going
/// to `log`; the whole group is killed with SIGKILL on drop.
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let out = fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether the process is still running (reaps it if not).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log unless the process is still running.
    pub fn assert_running(&mut self) {
        if !self.running() {
            panic!(
                "{} exited early ({:?}); its log:\n{}",
                self.name,
                self.child.try_wait(),
                self.log_text()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_group(self.pid(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Whether some socket of the network namespace that process `pid` lives in listens on TCP
/// `port` (IPv4 or IPv6). Read from /proc/<pid>/net/tcp{,6}: no fork, and no connection that
/// a closed gate would refuse.
pub fn listening(pid: i32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let mut it = l.split_whitespace();
                let local = it.nth(1).unwrap_or("");
                // Field 3 is the state: 0A = LISTEN.
                local.ends_with(&want) && it.nth(1) == Some("0A")
            })
    })
}

/// Polls `ok` every 20 ms until it holds, panicking with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < timeout, "timed out after {timeout:?}: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The slow endpoint: downloads of `/slow/<s>.bin` served at `limit_rate` [`SLOW_RATE`]
/// bytes a second, so each takes `s` seconds, for each `s` in [`SLOW_SECS`]: mostly longer
/// than the 5 s that Debian's stop schedule gives a graceful stop before TERM, like
/// downloads or long polls. The lengths differ so that downloads do not all end together
/// (the load picks them at random).
pub const SLOW_RATE: usize = 32 * 1024;
pub const SLOW_SECS: [u32; 5] = [6, 8, 10, 12, 14];

/// One Debian nginx with a prefix of its own (config, pid file, logs, content), started
/// daemonized in namespace `ns` the way an init script starts it. Endpoints, all 200:
/// `/` (index.html), `/version`, `/healthz`, and `/slow/<s>.bin` (see [`SLOW_SECS`]).
/// Keep-alive connections last until the client closes them, like a balancer's pool.
pub struct Nginx {
    pub ns: String,
    pub prefix: PathBuf,
    pub port: u16,
}

impl Nginx {
    /// Writes the config and content (`version` as /version and in the index page) and
    /// starts nginx listening on `listen` (e.g. `*:80`, `198.18.0.1:8080`).
    pub fn new(ns: &str, prefix: &Path, listen: &str, port: u16, version: &str) -> Self {
        write_site(prefix, listen, version);
        let n = Self {
            ns: ns.to_string(),
            prefix: prefix.to_path_buf(),
            port,
        };
        n.start();
        n
    }

    pub fn write_content(&self, version: &str) {
        write_content(&self.prefix, version);
    }

    pub fn pid_file(&self) -> PathBuf {
        self.prefix.join("nginx.pid")
    }

    pub fn conf(&self) -> PathBuf {
        self.prefix.join("nginx.conf")
    }

    /// The shell command that starts this nginx (see [`nginx_start_command`]).
    pub fn start_command(&self) -> String {
        nginx_start_command(&self.prefix.display().to_string())
    }

    /// The shell command that stops it (see [`nginx_stop_command`]).
    pub fn stop_command(&self) -> String {
        nginx_stop_command(&self.prefix.display().to_string())
    }

    pub fn master_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// Starts nginx and returns once it listens.
    pub fn start(&self) {
        let out = ns_cmd(&self.ns, "/usr/sbin/nginx")
            .arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(self.conf())
            .output()
            .expect("run nginx (cargo xtask test installs it)");
        assert!(
            out.status.success(),
            "nginx failed to start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until("nginx listens", Duration::from_secs(10), || {
            self.master_pid()
                .is_some_and(|pid| listening(pid, self.port))
        });
    }

    /// Stops nginx the way Debian's init script does (see [`nginx_stop_command`]) and
    /// returns once the master has exited.
    pub fn stop(&self) {
        run_ok(Command::new("sh").arg("-c").arg(self.stop_command()));
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // A daemonized master leads its own process group (it called setsid), workers in it.
        if let Some(pid) = self.master_pid() {
            kill_group(pid, libc::SIGKILL);
        }
    }
}

/// Writes the test site under `prefix`: `nginx.conf` (listening on `listen`, every path
/// under `prefix`, so the same tree serves from a host directory or from a container
/// image), the endpoints of [`Nginx`] and `version`'s content.
pub fn write_site(prefix: &Path, listen: &str, version: &str) {
    let html = prefix.join("html");
    fs::create_dir_all(prefix.join("logs")).unwrap();
    fs::create_dir_all(&html).unwrap();
    let conf = format!(
        "worker_processes 1;
error_log {p}/logs/error.log;
pid {p}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen {listen};
        root {html};
        location = /healthz {{ return 200 \"ok\\n\"; }}
        location /slow/ {{ limit_rate {rate}; }}
        location / {{ index index.html; }}
    }}
}}
",
        p = prefix.display(),
        html = html.display(),
        rate = SLOW_RATE,
    );
    fs::write(prefix.join("nginx.conf"), conf).unwrap();
    fs::create_dir_all(html.join("slow")).unwrap();
    for secs in SLOW_SECS {
        let body = vec![b's'; SLOW_RATE * secs as usize];
        fs::write(html.join(format!("slow/{secs}.bin")), body).unwrap();
    }
    write_content(prefix, version);
}

/// Writes `version` as /version and into the index page of the site under `prefix`.
pub fn write_content(prefix: &Path, version: &str) {
    let html = prefix.join("html");
    fs::write(html.join("version"), format!("{version}\n")).unwrap();
    fs::write(
        html.join("index.html"),
        format!("<html><body>drain test site, {version}</body></html>\n"),
    )
    .unwrap();
}

/// The shell command that starts the [`Nginx`] of prefix `prefix` (run in its namespace; it
/// daemonizes, as an init script's start does).
pub fn nginx_start_command(prefix: &str) -> String {
    format!("/usr/sbin/nginx -p {prefix} -c {prefix}/nginx.conf")
}

/// The shell command that stops the [`Nginx`] of prefix `prefix` the way Debian's
/// /etc/init.d/nginx does: `start-stop-daemon --stop --retry QUIT/5/TERM/5/KILL/5`, a
/// graceful stop (finish in-flight requests, close idle keep-alive connections), then after
/// 5 s a fast one (TERM: connections are cut), then KILL. It returns once nginx is gone,
/// like `systemctl stop` (whose unit gives QUIT the same 5 s before killing).
pub fn nginx_stop_command(prefix: &str) -> String {
    format!(
        "/sbin/start-stop-daemon --stop --quiet --retry=QUIT/5/TERM/5/KILL/5 --pidfile {prefix}/nginx.pid --name nginx"
    )
}

/// One backend server of the balancer.
#[derive(Clone, Debug)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
}

/// HAProxy settings the tests report with their figures.
pub const CHECK_INTER_MS: u32 = 300;
pub const CHECK_FALL: u32 = 2;
pub const CHECK_RISE: u32 = 2;

/// The `global` and `defaults` sections every balancer of the tests starts with: an admin
/// socket at `sock` (`show stat`), HTTP mode, short connect and check timeouts.
pub fn haproxy_head(sock: &Path, check_timeout: &str) -> String {
    format!(
        "global
    maxconn 4000
    stats socket {sock} mode 600 level admin
    log stdout format raw daemon
defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    timeout connect 500ms
    timeout client 60s
    timeout server 60s
    timeout check {check_timeout}
    retries 3
    option redispatch 1
",
        sock = sock.display()
    )
}

/// Writes `cfg` to `dir/haproxy.cfg`, has HAProxy check it, runs it in namespace `ns` in
/// the foreground (its own process group, killed on drop) and returns once its admin socket
/// `sock` answers.
pub fn haproxy_spawn(ns: &str, dir: &Path, cfg: &str, sock: &Path) -> Daemon {
    let path = dir.join("haproxy.cfg");
    fs::write(&path, cfg).unwrap();
    run_ok(
        Command::new("/usr/sbin/haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path),
    );
    let mut cmd = ns_cmd(ns, "/usr/sbin/haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let mut daemon = Daemon::spawn("haproxy", cmd, &dir.join("haproxy.log"));
    wait_until("haproxy's admin socket", Duration::from_secs(10), || {
        daemon.assert_running();
        UnixStream::connect(sock).is_ok()
    });
    daemon
}

/// Debian's HAProxy in the foreground (`-db`) in namespace `ns`, balancing `bind` over the
/// backends round-robin, with:
/// - `option httpchk GET /healthz` every [`CHECK_INTER_MS`], DOWN after [`CHECK_FALL`]
///   failures, UP after [`CHECK_RISE`] successes: the host's closed gate refuses the
///   checker's new connections, which is how the balancer learns to stop sending;
/// - `http-reuse always`: requests of all clients share pooled keep-alive connections to
///   the backends (the connections drain must let finish);
/// - `retries 3` + `option redispatch 1`: a refused or timed-out connect is retried on
///   another server, so a closed gate costs latency, not a failed request;
/// - a log of the failed requests only (`option dontlog-normal`) in `haproxy.log`, read by
///   [`HaProxy::logged_requests`];
/// - an admin socket (`show stat`) and, when `stats` is given, a stats page at
///   `http://<stats>/stats` (`;csv` for machines) for playbooks to poll.
pub struct HaProxy {
    pub daemon: Daemon,
    pub sock: PathBuf,
}

impl HaProxy {
    pub fn start(
        ns: &str,
        dir: &Path,
        bind: SocketAddr,
        stats: Option<SocketAddr>,
        backends: &[Backend],
    ) -> Self {
        fs::create_dir_all(dir).unwrap();
        let sock = dir.join("admin.sock");
        // The check's read timeout scales with the machine (DRAIN_TEST_SLOWDOWN, 5 under
        // TCG): a guest whose vCPUs another guest starves answered a check on the spare
        // nginx, which then carried all the load, in more than 300 ms, and HAProxy, with
        // both servers DOWN, answered 503. Connect-time detection (the gate) is unchanged:
        // for a check's connect HAProxy waits min(timeout connect, inter).
        let check = CHECK_INTER_MS * crate::cli::slowdown();
        let mut cfg = haproxy_head(&sock, &format!("{check}ms"));
        cfg.push_str(&format!(
            "    option http-keep-alive
frontend web
    bind {bind}
    default_backend fleet
backend fleet
    balance roundrobin
    http-reuse always
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter {CHECK_INTER_MS}ms fastinter {CHECK_INTER_MS}ms downinter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise {CHECK_RISE} pool-purge-delay 60s
"
        ));
        for b in backends {
            cfg.push_str(&format!("    server {} {} check\n", b.name, b.addr));
        }
        if let Some(s) = stats {
            cfg.push_str(&format!(
                "frontend stats\n    bind {s}\n    stats enable\n    stats uri /stats\n    stats refresh 1s\n"
            ));
        }
        let daemon = haproxy_spawn(ns, dir, &cfg, &sock);
        let lb = HaProxy { daemon, sock };
        let names: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        wait_until(
            "every backend UP in haproxy",
            Duration::from_secs(15),
            || {
                let st = lb.servers();
                names.iter().all(|n| st.get(*n).is_some_and(|s| s == "UP"))
            },
        );
        lb
    }

    /// The requests HAProxy logged (with `dontlog-normal`: those that failed, or needed a
    /// retry or a redispatch), counted by "server status termination-state": `h1 200 ----`
    /// served after a retry, `h1 200 SD--` the server closed the connection in the middle of
    /// the body, `h1 503 SC--` every connection attempt failed.
    pub fn logged_requests(&self) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for line in self
            .daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("\"GET "))
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            // client [date] frontend backend/server timers status bytes - - termination ...
            let Some(i) = f.iter().position(|t| t.starts_with("fleet/")) else {
                continue;
            };
            if let (Some(status), Some(term)) = (f.get(i + 2), f.get(i + 6)) {
                let server = f[i].trim_start_matches("fleet/");
                *by.entry(format!("{server} {status} {term}")).or_insert(0) += 1;
            }
        }
        by
    }

    /// HAProxy's log lines about a server changing state ("Server fleet/spare is DOWN,
    /// reason: Layer4 timeout ..."): what a 503 with no server (`<NOSRV>`) followed.
    pub fn server_events(&self) -> Vec<String> {
        self.daemon
            .log_text()
            .lines()
            .filter(|l| l.contains("Server fleet/") || l.contains("has no server available"))
            .map(str::to_string)
            .collect()
    }

    /// Status of each backend server (see [`show_stat`]).
    pub fn servers(&self) -> BTreeMap<String, String> {
        show_stat(&self.sock)
    }
}

/// Status of each server of backend `fleet` ("UP", "DOWN", "UP 1/2" going down, "DOWN 1/2"
/// going up, ...) from `show stat` on HAProxy's admin socket `sock`; empty if it does not
/// answer.
pub fn show_stat(sock: &Path) -> BTreeMap<String, String> {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return BTreeMap::new();
    };
    let mut text = String::new();
    if s.write_all(b"show stat\n").is_err() || s.read_to_string(&mut text).is_err() {
        return BTreeMap::new();
    }
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or("")
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        return BTreeMap::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > st && f[px] == "fleet" && f[sv] != "BACKEND")
        .map(|f| (f[sv].to_string(), f[st].to_string()))
        .collect()
}

/// What wrk reported.
#[derive(Debug, Default, Clone)]
pub struct WrkResult {
    pub requests: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    /// "Non-2xx or 3xx responses": wrk counts statuses above 399 (every endpoint here
    /// answers 200, so a 3xx would be a bug of the test, not a pass).
    pub non_2xx: u64,
    pub text: String,
}

impl WrkResult {
    /// Requests that did not get a good answer: non-2xx plus every socket error.
    pub fn failures(&self) -> u64 {
        self.non_2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts
    }

    fn add(self, o: WrkResult) -> WrkResult {
        WrkResult {
            requests: self.requests + o.requests,
            connect_errors: self.connect_errors + o.connect_errors,
            read_errors: self.read_errors + o.read_errors,
            write_errors: self.write_errors + o.write_errors,
            timeouts: self.timeouts + o.timeouts,
            non_2xx: self.non_2xx + o.non_2xx,
            text: format!("{}\n{}", self.text, o.text),
        }
    }

    fn parse(text: &str) -> Self {
        let mut r = WrkResult {
            text: text.to_string(),
            ..Default::default()
        };
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("wrk printed {s:?} where a count belongs ({e}): {text}"))
        };
        for line in text.lines().map(str::trim) {
            if let Some((n, _)) = line.split_once(" requests in ") {
                r.requests = num(n);
            }
            if let Some(rest) = line.strip_prefix("Socket errors:") {
                for part in rest.split(',') {
                    let mut it = part.split_whitespace();
                    let (k, v) = (it.next().unwrap_or(""), num(it.next().unwrap_or("")));
                    match k {
                        "connect" => r.connect_errors = v,
                        "read" => r.read_errors = v,
                        "write" => r.write_errors = v,
                        "timeout" => r.timeouts = v,
                        other => panic!("unknown wrk socket error kind {other:?}: {text}"),
                    }
                }
            }
            if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx = num(n);
            }
        }
        assert!(r.requests > 0, "wrk made no requests: {text}");
        r
    }
}

/// How wrk picks the next path from its list.
#[derive(Clone, Copy, Debug)]
pub enum Pick {
    InTurn,
    AtRandom,
}

/// What a wrk run asks for: `paths`, in turn or at random, each connection pausing
/// `pause_ms` between its requests (0: none).
pub struct Mix<'a> {
    pub paths: &'a [&'a str],
    pub pick: Pick,
    pub pause_ms: u32,
}

/// A running wrk (keep-alive connections) in namespace `ns`.
pub struct Wrk {
    child: Option<Child>,
    pub started: Instant,
    pub duration: Duration,
}

impl Wrk {
    pub fn start(
        ns: &str,
        script: &Path,
        url: &str,
        conns: u32,
        duration: Duration,
        mix: &Mix,
    ) -> Self {
        // Each wrk thread has its own Lua state and counter.
        let list = mix
            .paths
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let next = match mix.pick {
            Pick::InTurn => "n % #paths + 1",
            Pick::AtRandom => "math.random(#paths)",
        };
        let mut lua = format!(
            "local paths = {{ {list} }}\nlocal n = 0\nrequest = function()\n  n = {next}\n  return wrk.format(\"GET\", paths[n])\nend\n"
        );
        if mix.pause_ms > 0 {
            let ms = mix.pause_ms;
            lua.push_str(&format!("delay = function() return {ms} end\n"));
        }
        fs::write(script, lua).unwrap();
        let mut cmd = ns_cmd(ns, "wrk");
        cmd.args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{}s", duration.as_secs()),
            // Longer than the slowest response, so a timeout means a stuck request.
            "--timeout",
            "30s",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let child = cmd
            .spawn()
            .expect("start wrk (cargo xtask test installs it)");
        Self {
            child: Some(child),
            started: Instant::now(),
            duration,
        }
    }

    /// Whether wrk is still sending (it has not exited).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for wrk's own end (its `-d`) and returns its report.
    pub fn finish(mut self) -> WrkResult {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        WrkResult::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Ends the run now (SIGINT: wrk stops and prints its report as at the end of `-d`).
    pub fn stop(mut self) -> WrkResult {
        let child = self.child.take().unwrap();
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        WrkResult::parse(&String::from_utf8_lossy(&out.stdout))
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_group(c.id() as i32, libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// The tests' load through the balancer: two wrk runs side by side, `fast` connections
/// asking for the index page and /version (short requests on keep-alive connections, each
/// connection pausing [`FAST_PAUSE_MS`] between them: thousands a second, and CPU left
/// for the rest of the test) and `slow` connections asking for /slow/<s>.bin (downloads of 6 to
/// 14 s always in flight on every backend).
pub const FAST_PAUSE_MS: u32 = 10;

pub struct Load {
    pub fast: Wrk,
    pub slow: Wrk,
}

impl Load {
    pub fn start(
        ns: &str,
        dir: &Path,
        url: &str,
        fast: u32,
        slow: u32,
        duration: Duration,
    ) -> Self {
        let url = url.trim_end_matches('/');
        let slow_paths: Vec<String> = SLOW_SECS.iter().map(|s| format!("/slow/{s}.bin")).collect();
        Self {
            fast: Wrk::start(
                ns,
                &dir.join("fast.lua"),
                url,
                fast,
                duration,
                &Mix {
                    paths: &["/", "/version"],
                    pick: Pick::InTurn,
                    pause_ms: FAST_PAUSE_MS,
                },
            ),
            slow: Wrk::start(
                ns,
                &dir.join("slow.lua"),
                url,
                slow,
                duration,
                &Mix {
                    paths: &slow_paths.iter().map(String::as_str).collect::<Vec<_>>(),
                    pick: Pick::AtRandom,
                    pause_ms: 0,
                },
            ),
        }
    }

    pub fn running(&mut self) -> bool {
        self.fast.running() && self.slow.running()
    }

    /// Stops both (see [`Wrk::stop`]); their reports added up.
    pub fn stop(self) -> WrkResult {
        self.fast.stop().add(self.slow.stop())
    }

    /// Waits for both to end by themselves.
    pub fn finish(self) -> WrkResult {
        self.fast.finish().add(self.slow.finish())
    }
}

/// `GET path` over HTTP/1.0 from namespace `ns` to `addr`; the status code and body.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    crate::netns::in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// Whether a new TCP connection from namespace `ns` to `addr` is accepted within `timeout`
/// (a closed gate drops the SYN or answers RST: either is "not accepted").
pub fn connects(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    crate::netns::in_netns(ns, move || {
        TcpStream::connect_timeout(&addr, timeout).is_ok()
    })
}

/// `drain-user status --json` parsed.
pub fn parse_status(json: &str) -> serde_json::Value {
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("drain-user status --json printed no JSON ({e}): {json}"))
}

/// A counter of port `port` in a parsed status (0 when the port is not listed).
pub fn port_counter(st: &serde_json::Value, port: u16, name: &str) -> u64 {
    crate::cli::port_status(st, port)
        .and_then(|p| p[name].as_u64())
        .unwrap_or(0)
}

/// One client of a [`Trickle`]: when it started connecting, when it was done, and the HTTP
/// status it got or what went wrong.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub started: Instant,
    pub ended: Instant,
    pub result: Result<u16, String>,
}

impl Attempt {
    pub fn ok(&self) -> bool {
        self.result == Ok(200)
    }
}

/// A steady trickle of NEW connections, the clients a restart meets at the door: every
/// `every`, a new client thread in namespace `ns` connects to `addr` (giving its SYN
/// retries up to [`Trickle::CONNECT_TIMEOUT`], as a blocking connect() does), sends `GET path`
/// over HTTP/1.0 and reads the whole answer. Each attempt is recorded with its times.
pub struct Trickle {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    spawner: Option<thread::JoinHandle<Vec<Attempt>>>,
}

impl Trickle {
    /// What a blocking connect() gives by itself: Linux retransmits an unanswered SYN 6
    /// times (`tcp_syn_retries`), 1, 3, 7, 15, 31 and 63 s after the first, and fails ~127 s
    /// after it. A client that met the closed gate gets in at its first retransmission
    /// after the gate opens; with a shorter timeout, a gate closed for longer than ~31 s
    /// (a slow Ansible cycle) would fail clients that the kernel alone would have saved.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(130);

    pub fn start(ns: &str, addr: SocketAddr, path: &str, every: Duration) -> Self {
        use std::sync::{atomic::Ordering, Arc};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ns, path, flag) = (ns.to_string(), path.to_string(), stop.clone());
        let spawner = thread::spawn(move || {
            // Threads spawned from here inherit this thread's network namespace.
            crate::netns::enter_netns(&ns);
            let mut workers = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let path = path.clone();
                workers.push(
                    thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || {
                            let started = Instant::now();
                            let result = one_request(addr, &path);
                            Attempt {
                                started,
                                ended: Instant::now(),
                                result,
                            }
                        })
                        .expect("spawn a trickle client"),
                );
                thread::sleep(every);
            }
            workers
                .into_iter()
                .map(|w| w.join().expect("a trickle client panicked"))
                .collect()
        });
        Self {
            stop,
            spawner: Some(spawner),
        }
    }

    /// Stops starting clients, waits for those under way and returns every attempt.
    pub fn finish(mut self) -> Vec<Attempt> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.spawner
            .take()
            .unwrap()
            .join()
            .expect("trickle spawner")
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        // Unwinding: stop spawning; clients end by their own timeouts.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn one_request(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let mut s = TcpStream::connect_timeout(&addr, Trickle::CONNECT_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&resp);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {} bytes", resp.len()))
}
