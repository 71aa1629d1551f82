//! The NetNsPair guard: real sockets across the veth pair, nsenter keeps bpffs, and drop
//! removes everything, also when the test panics.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::Duration,
};

use drain_tests::{netns::NetNsPair, object::ensure_bpffs};

fn connect_across(pair: &NetNsPair, server: IpAddr) {
    let listener = pair.in_ns(&pair.b, || {
        TcpListener::bind((server, 0)).expect("bind in b")
    });
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mut client = pair.in_ns(&pair.a, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect from a to {addr}: {e}"))
    });
    let (mut conn, peer) = listener.accept().unwrap();
    let want_peer = if server.is_ipv4() {
        IpAddr::V4(pair.a_v4)
    } else {
        IpAddr::V6(pair.a_v6)
    };
    assert_eq!(
        peer.ip(),
        want_peer,
        "the connection came over the veth from a"
    );
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn tcp_over_the_veth_pair_v4_and_v6() {
    let pair = NetNsPair::new();
    assert!(pair.veth_a.len() <= 15 && pair.veth_b.len() <= 15);
    connect_across(&pair, IpAddr::V4(pair.b_v4));
    connect_across(&pair, IpAddr::V6(pair.b_v6));
    // The addresses exist only in the namespaces: the host cannot bind them.
    assert!(
        TcpListener::bind((pair.b_v4, 0)).is_err(),
        "{} exists on the host",
        pair.b_v4
    );
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn namespaces_are_distinct_and_cmd_keeps_bpffs() {
    ensure_bpffs();
    let pair = NetNsPair::new();
    let host = std::fs::metadata("/proc/self/ns/net").unwrap();
    let (a, b) = (pair.netns_inode(&pair.a), pair.netns_inode(&pair.b));
    assert_ne!(a, b);
    assert_ne!(a, std::os::unix::fs::MetadataExt::ino(&host));
    // What a process inside sees as its own namespace is the inode reported here.
    let out = pair
        .cmd(&pair.a, "stat")
        .args(["-L", "-c", "%i", "/proc/self/ns/net"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a.to_string());
    // nsenter --net keeps the host mount namespace, so bpffs is still there.
    let out = pair
        .cmd(&pair.b, "stat")
        .args(["-f", "-c", "%T", "/sys/fs/bpf"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "bpf_fs",
        "{out:?}"
    );
    // The veth ends live only in the namespaces, never in the host's.
    for dev in [&pair.veth_a, &pair.veth_b] {
        assert!(
            !Path::new("/sys/class/net").join(dev).exists(),
            "{dev} on the host"
        );
    }
    let out = pair
        .cmd(&pair.a, "ip")
        .args(["-o", "addr", "show", "dev", &pair.veth_a])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&pair.a_v4.to_string()), "{text}");
    assert!(text.contains(&pair.a_v6.to_string()), "{text}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test`"]
fn drop_removes_the_namespaces_even_on_panic() {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let pair = NetNsPair::new();
        names
            .lock()
            .unwrap()
            .extend([pair.a.clone(), pair.b.clone()]);
        pair.in_ns(&pair.a, || panic!("deliberate panic inside the namespace"));
    });
    assert!(result.is_err(), "the panic in in_ns was not re-raised");
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    for ns in names {
        assert!(
            !Path::new("/var/run/netns").join(&ns).exists(),
            "{ns} left behind"
        );
    }
}
