//! Section 2: a SYN flood absorbed per CPU, drain against the filters an operator would use
//! instead, and an established stream that must keep flowing during the flood.
//!
//! The generator is BPF_PROG_TEST_RUN in live-frame mode (BPF_F_TEST_XDP_LIVE_FRAMES): a
//! program that returns XDP_TX sends the test frame out of the peer's veth end, again and
//! again, into the gated namespace (pktgen is not built into this kernel). The generator
//! thread is pinned to one CPU; the receiving veth's NAPI poll then runs in softirq on that
//! same CPU, so the figure is packets per second of that CPU's time: the generator thread's
//! runtime plus ksoftirqd's on that CPU (both from /proc/.../schedstat, exact). The
//! generator's own share is measured too: the "floor" row is a program that drops every
//! frame at once.

use std::{
    os::fd::{AsFd, BorrowedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use drain_tests::{
    frames::{Ipv4, Layer, Packet, Tcp},
    netns::{enter_netns, NetNsPair},
    object::{load_trivial, pin_fd, BPF_PROG_TYPE_XDP, BPF_XDP, XDP_DROP, XDP_TX},
    testrun,
};
use serde_json::json;

use super::{
    report::{f, median, Section},
    stream::Stream,
    sys::{cpu_ns, kthread, pin_thread, rx_packets, sh, snmp, Ctx, Gate},
};

/// The flooded port: nothing listens there, so with no filter the stack answers each SYN
/// with a RST.
const PORT: u16 = 9999;

/// Sends `frame` out of `ifindex` (of the calling thread's namespace) `repeat` times.
fn send_live(prog: BorrowedFd<'_>, frame: &[u8], ifindex: u32, repeat: u32) -> Result<()> {
    testrun::send_live(prog, frame, ifindex, repeat)
        .context("BPF_PROG_TEST_RUN with live frames (kernel ≥ 5.18)")
}

/// A generator thread flooding from namespace `b` on CPU `cpu` until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Result<()>>>,
    /// The generator thread's id, for its schedstat.
    tid: i32,
}

impl Flood {
    fn start(pair: &NetNsPair, cpu: usize) -> Result<Self> {
        let frame = syn_frame(pair);
        let ifindex = pair.ifindex(&pair.b, &pair.veth_b);
        let prog = load_trivial(BPF_PROG_TYPE_XDP, BPF_XDP, XDP_TX, "bench_gen")?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let ns = pair.b.clone();
        let stop2 = stop.clone();
        let thread = thread::spawn(move || {
            enter_netns(&ns);
            let pinned = pin_thread(cpu);
            // SAFETY: gettid has no preconditions.
            let _ = tx.send(pinned.as_ref().map(|_| unsafe { libc::gettid() }).ok());
            pinned?;
            while !stop2.load(Ordering::Relaxed) {
                send_live(prog.as_fd(), &frame, ifindex, 1 << 16)?;
            }
            Ok(())
        });
        let tid = rx.recv().ok().flatten();
        let mut flood = Self {
            stop,
            thread: Some(thread),
            tid: tid.unwrap_or(0),
        };
        if tid.is_none() {
            flood.finish()?;
            bail!("the generator thread did not start");
        }
        Ok(flood)
    }

    fn cpu_ns(&self) -> Result<u64> {
        cpu_ns(&format!("{}/task/{}", std::process::id(), self.tid))
    }

    fn finish(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the generator thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("bench: flood generator: {e:#}");
        }
    }
}

/// CPU nanoseconds the generator spends per frame by itself: the same live-frame runs from
/// the same CPU with a program that drops each frame instead of sending it.
fn generator_ns(pair: &NetNsPair, cpu: usize, frames: u32) -> Result<f64> {
    let frame = syn_frame(pair);
    let ifindex = pair.ifindex(&pair.b, &pair.veth_b);
    let prog = load_trivial(BPF_PROG_TYPE_XDP, BPF_XDP, XDP_DROP, "bench_gen0")?;
    let ns = pair.b.clone();
    thread::spawn(move || {
        enter_netns(&ns);
        pin_thread(cpu)?;
        send_live(prog.as_fd(), &frame, ifindex, 1 << 12)?;
        let c0 = cpu_ns("thread-self")?;
        send_live(prog.as_fd(), &frame, ifindex, frames)?;
        Ok((cpu_ns("thread-self")? - c0) as f64 / f64::from(frames))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?
}

/// A SYN from the peer end to PORT, addressed to the receiving veth's MAC.
fn syn_frame(pair: &NetNsPair) -> Vec<u8> {
    Packet {
        layers: vec![Layer::Ethernet {
            dst: pair.mac(&pair.a, &pair.veth_a),
            src: pair.mac(&pair.b, &pair.veth_b),
        }],
    }
    .ipv4(Ipv4::new(pair.b_v4, pair.a_v4))
    .tcp(Tcp::syn(40000, PORT))
    .build()
    .bytes
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    /// A program that drops every frame at XDP: the generator and veth alone.
    Floor,
    DrainXdp,
    DrainTc,
    /// `iptables -t raw -A PREROUTING ...` with this binary.
    IptRaw(&'static str),
    /// The seed's `iptables -I INPUT ...` with this binary.
    IptInput(&'static str),
    NftNetdev,
    Nothing,
}

impl Filter {
    fn label(self) -> String {
        match self {
            Filter::Floor => "floor: XDP `return XDP_DROP`".into(),
            Filter::DrainXdp => "drain, XDP".into(),
            Filter::DrainTc => "drain, TC".into(),
            Filter::IptRaw(b) => format!("`{b} -t raw -A PREROUTING`"),
            Filter::IptInput(b) => format!("`{b} -I INPUT` (the seed's rule)"),
            Filter::NftNetdev => "nftables, netdev ingress".into(),
            Filter::Nothing => "nothing (the stack sends RSTs)".into(),
        }
    }

    /// Puts the filter in place in namespace `a`; what it returns keeps it there.
    fn apply(self, ctx: &Ctx, pair: &NetNsPair) -> Result<Option<Gate>> {
        let dev = &pair.veth_a;
        let rule = format!("-p tcp --syn --dport {PORT} -j DROP");
        match self {
            Filter::Floor => {
                let prog = load_trivial(BPF_PROG_TYPE_XDP, BPF_XDP, XDP_DROP, "bench_floor")?;
                let pin = format!("/sys/fs/bpf/drain-bench-floor-{}", std::process::id());
                pin_fd(&prog, std::path::Path::new(&pin))?;
                let r = sh(
                    &pair.a,
                    &format!("ip link set dev {dev} xdpdrv pinned {pin}"),
                );
                let _ = std::fs::remove_file(&pin);
                r?;
            }
            Filter::DrainXdp | Filter::DrainTc => {
                let attach = if self == Filter::DrainXdp {
                    "xdp"
                } else {
                    "tc"
                };
                let p = PORT.to_string();
                let args = [
                    "--port", &p, "--iface", dev, "--attach", attach, "--ttl", "10m",
                ];
                return ctx.gate_on(&pair.a, &args).map(Some);
            }
            Filter::IptRaw(b) => {
                sh(&pair.a, &format!("{b} -t raw -A PREROUTING {rule}"))?;
            }
            Filter::IptInput(b) => {
                sh(&pair.a, &format!("{b} -I INPUT {rule}"))?;
            }
            Filter::NftNetdev => {
                sh(
                    &pair.a,
                    &format!(
                        "nft -f - <<'EOF'\ntable netdev t {{ chain c {{ type filter hook ingress \
                         device {dev} priority 0; tcp dport {PORT} tcp flags & (syn|ack) == syn \
                         drop; }}; }}\nEOF"
                    ),
                )?;
            }
            Filter::Nothing => {}
        }
        Ok(None)
    }
}

/// What one flood window measured.
struct Absorbed {
    packets: u64,
    wall_s: f64,
    /// CPU time of the generator's CPU spent on the flood: generator thread + ksoftirqd.
    cpu_s: f64,
    /// RSTs the stack sent (TcpOutRsts) during the window.
    rsts: u64,
}

fn absorb(pair: &NetNsPair, cpu: usize, window: Duration) -> Result<Absorbed> {
    let softirqd = kthread(&format!("ksoftirqd/{cpu}"))?;
    let flood = Flood::start(pair, cpu)?;
    thread::sleep(Duration::from_millis(150));
    let sample = || -> Result<(Instant, u64, u64, u64)> {
        Ok((
            Instant::now(),
            rx_packets(&pair.a, &pair.veth_a)?,
            flood.cpu_ns()? + cpu_ns(&softirqd)?,
            snmp(&pair.a, "Tcp", "OutRsts")?,
        ))
    };
    let (t0, p0, c0, r0) = sample()?;
    thread::sleep(window);
    let (t1, p1, c1, r1) = sample()?;
    drop(flood);
    Ok(Absorbed {
        packets: p1 - p0,
        wall_s: (t1 - t0).as_secs_f64(),
        cpu_s: (c1 - c0) as f64 / 1e9,
        rsts: r1 - r0,
    })
}

/// A fresh namespace pair whose receiving veth has NAPI (GRO on), so XDP_TX frames from the
/// peer are taken in whatever filter is on it.
fn flood_pair() -> Result<NetNsPair> {
    let pair = super::stream::stream_pair()?;
    sh(&pair.a, &format!("ethtool -K {} gro on", pair.veth_a))?;
    Ok(pair)
}

pub fn section(ctx: &Ctx) -> Result<Section> {
    let rounds = ctx.pick(3, 1);
    let window = ctx.pick(Duration::from_millis(1500), Duration::from_millis(200));
    let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let legacy = std::path::Path::new("/usr/sbin/iptables-legacy").exists();
    let mut filters = vec![
        Filter::Floor,
        Filter::DrainXdp,
        Filter::DrainTc,
        Filter::IptRaw("iptables"),
        Filter::IptInput("iptables"),
    ];
    if legacy {
        filters.extend([
            Filter::IptRaw("iptables-legacy"),
            Filter::IptInput("iptables-legacy"),
        ]);
    }
    filters.extend([Filter::NftNetdev, Filter::Nothing]);
    let iptables_v = sh_host("iptables -V").unwrap_or_default();

    let gen_frames = ctx.pick(1 << 22, 1 << 18);
    let mut got: Vec<Vec<Absorbed>> = filters.iter().map(|_| Vec::new()).collect();
    let mut gen = Vec::new();
    for _ in 0..rounds {
        gen.push(generator_ns(&flood_pair()?, cpu, gen_frames)?);
        for (i, flt) in filters.iter().enumerate() {
            let pair = flood_pair()?;
            let guard = flt.apply(ctx, &pair)?;
            got[i].push(absorb(&pair, cpu, window)?);
            drop(guard);
        }
    }
    // The stream during the flood, once per filter, next to the same stream without it.
    let stream_window = ctx.pick(Duration::from_millis(1500), Duration::from_millis(200));
    let mut streams = Vec::new();
    for flt in &filters {
        if *flt == Filter::Floor || (ctx.smoke && *flt != Filter::DrainXdp) {
            // The floor drops every frame, ARP and the stream's included; a smoke run
            // checks the stream with drain XDP only.
            streams.push(None);
            continue;
        }
        let pair = flood_pair()?;
        let guard = flt.apply(ctx, &pair)?;
        let stream = Stream::start(&pair)?;
        thread::sleep(Duration::from_millis(100));
        let idle = stream.measure(stream_window);
        let flood = Flood::start(&pair, cpu)?;
        thread::sleep(Duration::from_millis(100));
        let flooded = stream.measure(stream_window);
        drop(flood);
        drop(stream);
        drop(guard);
        streams.push(Some((idle, flooded)));
    }

    let gen_ns = median(&gen);
    let mut s = Section::new(
        "flood",
        "2. SYN flood absorbed per CPU",
        format!(
            "60-byte IPv4 SYNs to a port nothing listens on, sent into the gated namespace over \
             a veth pair by BPF_PROG_TEST_RUN live frames (XDP_TX out of the peer end), the \
             generator pinned to CPU {cpu}; the receiving veth's NAPI then runs in softirq on \
             that same CPU. The CPU time of that CPU spent on the flood (generator thread + \
             ksoftirqd/{cpu}, exact runtimes from schedstat, so other tenants of the machine \
             do not count) over the packets the receiving veth took in gives ns per SYN for \
             the whole path. The generator's own share, measured in the same rounds (the same \
             live-frame runs with a program that drops each frame instead of sending it: \
             {} ns), is subtracted to give the **receive side**: the veth's NAPI, the filter \
             and what lies behind it; its inverse is **Mpps per CPU**. The floor row is an \
             XDP program that drops every frame at once: the veth alone. {rounds} interleaved \
             rounds of {:.1} s, each in a fresh namespace pair (GRO on for NAPI), median. \
             `iptables` here is {}.",
            f(gen_ns, 0),
            window.as_secs_f64(),
            iptables_v.trim()
        ),
    );
    s.columns(&[
        "filter",
        "Mpps per CPU (receive side)",
        "ns per SYN (receive side)",
        "ns per SYN (whole path)",
        "Mpps (wall)",
        "CPU busy",
        "stack RSTs / SYN",
        "stream on another port: during flood / before (Gbit/s)",
    ]);
    // Whole-path ns per SYN, median over rounds.
    let whole = |a: &[Absorbed]| {
        median(
            &a.iter()
                .map(|x| x.cpu_s * 1e9 / x.packets as f64)
                .collect::<Vec<_>>(),
        )
    };
    let recv = |a: &[Absorbed]| (whole(a) - gen_ns).max(1.0);
    let mut data = Vec::new();
    for (i, flt) in filters.iter().enumerate() {
        let a = &got[i];
        let wall = median(
            &a.iter()
                .map(|x| x.packets as f64 / x.wall_s / 1e6)
                .collect::<Vec<_>>(),
        );
        let busy = median(&a.iter().map(|x| x.cpu_s / x.wall_s).collect::<Vec<_>>());
        let rst = a.iter().map(|x| x.rsts).sum::<u64>() as f64
            / a.iter().map(|x| x.packets).sum::<u64>().max(1) as f64;
        let stream = streams[i].as_ref().map_or("—".into(), |(idle, flooded)| {
            format!(
                "{} / {} (slowest 100 ms: {})",
                f(flooded.rate * 8e-9, 2),
                f(idle.rate * 8e-9, 2),
                f(flooded.min_slot_rate * 8e-9, 2)
            )
        });
        s.row(vec![
            flt.label(),
            f(1e3 / recv(a), 2),
            f(recv(a), 0),
            f(whole(a), 0),
            f(wall, 2),
            format!("{}%", f(busy * 100.0, 0)),
            f(rst, 2),
            stream,
        ]);
        data.push(json!({
            "filter": flt.label(),
            "mpps_per_cpu_receive_side": 1e3 / recv(a),
            "ns_per_syn_receive_side": recv(a),
            "ns_per_syn_whole_path": whole(a),
            "mpps_wall": wall,
            "cpu_busy": busy,
            "rounds": a.iter().map(|x| json!({
                "packets": x.packets, "wall_s": x.wall_s, "cpu_s": x.cpu_s, "rsts": x.rsts
            })).collect::<Vec<_>>(),
            "stream_idle_bytes_per_s": streams[i].as_ref().map(|s| s.0.rate),
            "stream_flood_bytes_per_s": streams[i].as_ref().map(|s| s.1.rate),
            "stream_flood_min_100ms_bytes_per_s": streams[i].as_ref().map(|s| s.1.min_slot_rate),
        }));
        // A filter that let SYNs through to TCP would show as RSTs.
        if *flt != Filter::Nothing && rst > 0.01 {
            bail!(
                "{}: the stack answered {rst:.2} RSTs per SYN: the filter did not drop",
                flt.label()
            );
        }
    }
    s.data = json!({"generator_ns_per_frame": gen, "filters": data});
    s.note(
        "The receive side still carries the veth's own work (its NAPI ring, building an skb \
         for the paths after XDP, and the generator's XDP_TX hand-off): that is the floor row, \
         and a NIC driver has its own equivalent. The whole-path column keeps the generator \
         in, which narrows every ratio.",
    );
    let find = |want: Filter| {
        filters
            .iter()
            .position(|x| *x == want)
            .expect("a measured filter")
    };
    let xdp = &got[find(Filter::DrainXdp)];
    for (what, other, goal) in [
        (
            "the seed's `iptables -I INPUT` rule",
            Filter::IptInput("iptables"),
            5.0,
        ),
        ("nftables netdev ingress", Filter::NftNetdev, 2.0),
    ] {
        let o = &got[find(other)];
        let r = recv(o) / recv(xdp);
        s.target(
            format!("drain XDP vs {what}, Mpps per CPU (receive side)"),
            format!("≥ {goal}×"),
            format!(
                "{}× (whole path, generator included: {}×)",
                f(r, 2),
                f(whole(o) / whole(xdp), 2)
            ),
            r >= goal,
        );
    }
    let xi = find(Filter::DrainXdp);
    let (idle, flooded) = streams[xi].as_ref().context("drain XDP has a stream row")?;
    s.target(
        "established stream on another port keeps flowing during the flood (drain XDP)",
        "> 0 in every 100 ms",
        format!(
            "{} Gbit/s during, {} before; slowest 100 ms {} Gbit/s",
            f(flooded.rate * 8e-9, 2),
            f(idle.rate * 8e-9, 2),
            f(flooded.min_slot_rate * 8e-9, 2)
        ),
        flooded.min_slot_rate > 0.0,
    );
    Ok(s)
}

/// `sh -c script` on the host (read-only queries such as `iptables -V`).
fn sh_host(script: &str) -> Result<String> {
    let out = std::process::Command::new("sh")
        .args(["-c", script])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
