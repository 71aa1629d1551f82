//! The product claim, end to end: a real nginx under a real load generator (wrk) is taken out
//! of service and restarted without failing a single request, while the same restart
//! without drain fails requests. Namespaces, addresses and nginx instances are the test's own.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use drain_tests::{cli::Drain, netns::NetNsPair, require_root};

const PORT: u16 = 8080;

/// One nginx instance with its own prefix (config, pid, logs), stopped on drop.
struct Nginx<'a> {
    pair: &'a NetNsPair,
    prefix: PathBuf,
}

impl<'a> Nginx<'a> {
    fn new(pair: &'a NetNsPair, tag: &str) -> Self {
        let prefix = std::env::temp_dir().join(format!("drain-nginx-{}-{tag}", pair.a));
        let _ = fs::remove_dir_all(&prefix);
        fs::create_dir_all(prefix.join("logs")).unwrap();
        let conf = format!(
            "worker_processes 1;
error_log {p}/logs/error.log;
pid {p}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    # Keep-alive connections live until the client closes them, like a balancer's pool.
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    server {{
        listen {a}:{port};
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
",
            p = prefix.display(),
            a = pair.a_v4,
            port = PORT
        );
        fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let n = Nginx { pair, prefix };
        n.start();
        n
    }

    fn nginx(&self) -> Command {
        let mut c = self.pair.cmd(&self.pair.a, "nginx");
        c.arg("-p")
            .arg(&self.prefix)
            .arg("-c")
            .arg(self.prefix.join("nginx.conf"));
        c
    }

    fn start(&self) {
        let out = self.nginx().output().expect("run nginx");
        assert!(
            out.status.success(),
            "nginx failed to start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Ready when it listens (checked with ss: a connect would be refused by the gate).
        let t = Instant::now();
        loop {
            let ss = self
                .pair
                .cmd(&self.pair.a, "ss")
                .args(["-Hltn", &format!("( sport = :{PORT} )")])
                .output()
                .expect("run ss");
            if !ss.stdout.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nginx did not start listening"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops nginx with `signal` (quit = graceful, stop = fast, as SIGTERM) and waits for the
    /// master to exit.
    fn stop(&self, signal: &str) {
        let pid = fs::read_to_string(self.prefix.join("nginx.pid")).unwrap_or_default();
        let _ = self.nginx().args(["-s", signal]).output();
        let proc_dir = Path::new("/proc").join(pid.trim());
        let t = Instant::now();
        while !pid.trim().is_empty() && proc_dir.exists() {
            assert!(t.elapsed() < Duration::from_secs(30), "nginx did not stop");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx<'_> {
    fn drop(&mut self) {
        self.stop("stop");
        let _ = fs::remove_dir_all(&self.prefix);
    }
}

/// What wrk reported.
#[derive(Debug, Default)]
struct WrkResult {
    requests: u64,
    connect_errors: u64,
    read_errors: u64,
    write_errors: u64,
    timeouts: u64,
    non_2xx: u64,
}

impl WrkResult {
    fn failed_requests(&self) -> u64 {
        self.read_errors + self.write_errors + self.timeouts + self.non_2xx
    }
}

fn wrk(pair: &NetNsPair, secs: u32, conns: u32) -> Child {
    pair.cmd(&pair.b, "wrk")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--timeout",
            "5s",
            &format!("http://{}:{PORT}/", pair.a_v4),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wrk (cargo xtask test installs it)")
}

fn parse_wrk(out: &Output) -> WrkResult {
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = WrkResult::default();
    for line in text.lines().map(str::trim) {
        if let Some(n) = line
            .split(" requests in ")
            .next()
            .filter(|_| line.contains(" requests in "))
        {
            r.requests = n.trim().parse().unwrap();
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (k, v) = (it.next().unwrap(), it.next().unwrap().parse().unwrap());
                match k {
                    "connect" => r.connect_errors = v,
                    "read" => r.read_errors = v,
                    "write" => r.write_errors = v,
                    "timeout" => r.timeouts = v,
                    _ => {}
                }
            }
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = n.trim().parse().unwrap();
        }
    }
    assert!(r.requests > 0, "wrk made no requests: {text}");
    r
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn nginx_restart_under_load_fails_no_request_with_drain_and_fails_some_without() {
    require_root();

    // Without drain: restart nginx (fast stop, as an init script's TERM does) under load.
    let pair = NetNsPair::new();
    let nginx = Nginx::new(&pair, "plain");
    let load = wrk(&pair, 4, 20);
    thread::sleep(Duration::from_millis(1500));
    nginx.stop("stop");
    nginx.start();
    let plain = parse_wrk(&load.wait_with_output().unwrap());
    println!("without drain: {plain:?}");
    assert!(
        plain.failed_requests() + plain.connect_errors > 0,
        "restarting nginx under load without drain failed nothing: {plain:?} (the test cannot tell anything)"
    );
    drop(nginx);
    drop(pair);

    // With drain: gate on, the balancer's pooled connections finish their work, wait, then
    // the same restart, then gate off.
    let pair = NetNsPair::new();
    // Turns the gate off when dropped (also on panic).
    let drain = Drain::new(&pair, &pair.a);
    let nginx = Nginx::new(&pair, "drained");
    let load = wrk(&pair, 4, 20);
    thread::sleep(Duration::from_millis(1500));
    drain.on(&["--port", &PORT.to_string(), "--ttl", "2m"]);

    // While the gate is on: the 20 pooled connections are live and counted, and a new
    // connection is refused.
    let st = drain.run(&["status", "--json"]).stdout;
    assert!(
        st.contains("\"live_connections\":20"),
        "status while wrk runs: {st}"
    );
    let refused = pair.in_ns(&pair.b, {
        let addr = (pair.a_v4, PORT);
        move || {
            std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_millis(800)).is_err()
        }
    });
    assert!(refused, "a new connection got through the gate");

    // The balancer stops using this host (wrk's run ends and it closes its connections);
    // wait returns once they are gone.
    let t = Instant::now();
    // Past the CLI deadline: wait may take its whole 30 s timeout before it fails.
    drain
        .spawn(&["wait", "--timeout", "30s"])
        .wait_for(Duration::from_secs(45))
        .expect_ok();
    let drained = parse_wrk(&load.wait_with_output().unwrap());
    println!(
        "with drain: {drained:?}, wait returned after {:?}",
        t.elapsed()
    );
    assert_eq!(
        drained.failed_requests(),
        0,
        "requests failed during the drain: {drained:?}"
    );
    assert_eq!(
        drained.connect_errors, 0,
        "wrk needed no new connection: {drained:?}"
    );

    // The deploy: the same restart, now with nothing in flight.
    nginx.stop("stop");
    nginx.start();
    drain.off();

    // Back in service.
    let after = parse_wrk(&wrk(&pair, 1, 10).wait_with_output().unwrap());
    assert_eq!(
        after.failed_requests() + after.connect_errors,
        0,
        "after gate off: {after:?}"
    );
}
