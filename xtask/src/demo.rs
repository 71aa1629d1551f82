//! `cargo xtask demo`: drain, shown working in two throwaway network namespaces.
//!
//! A server in namespace "server" and long-lived clients in namespace "clients" keep
//! exchanging messages while the gate goes on, new connections are refused, the old ones
//! finish, `wait` notices, and the gate goes off again.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use drain_tests::netns::NetNsPair;

const PORT: u16 = 8080;

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

fn drain(pair: &NetNsPair, bin: &Path, args: &[&str]) -> Result<i32> {
    println!("    $ drain-user {}", args.join(" "));
    let out = pair
        .cmd(&pair.a, bin.to_str().unwrap())
        .args(args)
        .output()?;
    // Progress goes to stderr and the verdict to stdout: show them in that order.
    for line in String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
    {
        println!("      {line}");
    }
    Ok(out.status.code().unwrap_or(-1))
}

fn try_connect(pair: &NetNsPair, addr: SocketAddr) -> String {
    pair.in_ns(&pair.b, move || {
        let t = Instant::now();
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => format!("connected in {:.1} ms", t.elapsed().as_secs_f64() * 1e3),
            Err(e) => format!("failed after {:.1} s: {e}", t.elapsed().as_secs_f64()),
        }
    })
}

pub fn run(bin: &Path) -> Result<()> {
    println!("drain demo: a server, three long-lived clients, and a deploy in between.");
    let pair = NetNsPair::new();
    let server = SocketAddr::new(pair.a_v4.into(), PORT);
    println!(
        "namespaces: {} (server {server}) and {} (clients {}), joined by a veth pair",
        pair.a, pair.b, pair.b_v4
    );

    // An echo server: one thread per connection, replies to each line.
    let listener = pair.in_ns(&pair.a, move || TcpListener::bind(server))?;
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut w = conn.try_clone().expect("clone");
                for line in BufReader::new(conn).lines().map_while(Result::ok) {
                    if writeln!(w, "echo {line}").is_err() {
                        break;
                    }
                }
            });
        }
    });

    // Three clients, each sending a message every 100 ms until told to stop.
    let exchanged = Arc::new(AtomicU64::new(0));
    let mut stops = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, ex) = (stop.clone(), exchanged.clone());
        let conn = pair.in_ns(&pair.b, move || TcpStream::connect(server))?;
        clients.push(thread::spawn(move || -> Result<()> {
            let mut r = BufReader::new(conn.try_clone()?);
            let mut w = conn;
            let mut line = String::new();
            let mut n = 0;
            while !stop2.load(Ordering::Relaxed) {
                writeln!(w, "client{i} message {n}")?;
                line.clear();
                r.read_line(&mut line)?;
                if !line.starts_with("echo") {
                    bail!("client {i}: bad reply {line:?}");
                }
                ex.fetch_add(1, Ordering::Relaxed);
                n += 1;
                thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }));
        stops.push(stop);
    }
    thread::sleep(Duration::from_millis(500));

    step(1, "Before the deploy: 3 clients connected and talking");
    println!(
        "    messages exchanged so far: {}",
        exchanged.load(Ordering::Relaxed)
    );
    println!("    a new connection: {}", try_connect(&pair, server));

    step(
        2,
        "Gate on: refuse new connections to port 8080 (established ones keep flowing)",
    );
    if drain(&pair, bin, &["gate", "on", "--port", "8080", "--ttl", "5m"])? != 0 {
        bail!("gate on failed");
    }
    let before = exchanged.load(Ordering::Relaxed);
    println!("    a new connection: {}", try_connect(&pair, server));
    let after = exchanged.load(Ordering::Relaxed);
    println!(
        "    meanwhile the 3 old clients exchanged {} more messages (total {after})",
        after - before
    );
    drain(&pair, bin, &["status"])?;

    step(
        3,
        "Wait for the live connections to finish (clients leave one by one)",
    );
    let stopper = thread::spawn(move || {
        for (i, s) in stops.iter().enumerate() {
            thread::sleep(Duration::from_millis(700));
            s.store(true, Ordering::Relaxed);
            println!("      (client {i} is done and closes its connection)");
        }
    });
    let t = Instant::now();
    let code = drain(&pair, bin, &["wait", "--timeout", "30s"])?;
    println!(
        "    wait exited {code} after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    stopper.join().expect("stopper thread");
    for c in clients {
        c.join().expect("client thread")?;
    }
    println!(
        "    every client finished cleanly: {} messages exchanged, none failed",
        exchanged.load(Ordering::Relaxed)
    );

    step(
        4,
        "Here the deploy would stop, update and start the server. Gate off:",
    );
    if drain(&pair, bin, &["gate", "off"])? != 0 {
        bail!("gate off failed");
    }
    println!("    a new connection: {}", try_connect(&pair, server));
    drain(&pair, bin, &["status"])?;

    drop(pair);
    // /sys/fs/bpf/drain itself stays (empty, root-only) so no other user can claim the name.
    let left = std::fs::read_dir("/sys/fs/bpf/drain").map_or(0, |d| d.count());
    println!(
        "\ndone: namespaces removed, nothing left pinned ({})",
        if left == 0 {
            "/sys/fs/bpf/drain is empty".to_owned()
        } else {
            format!("/sys/fs/bpf/drain holds {left} state directories (other namespaces' gates?)")
        }
    );
    Ok(())
}
