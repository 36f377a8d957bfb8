//! The send hop, end to end: real senders (nc, Python) in namespaces the test creates,
//! the real udptrace binary, assertions on what a user reads in its JSON.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use udptrace_testkit::*;

fn send_hop(path: &Value) -> &Value {
    assert_eq!(path["type"], "path", "{path}");
    let hop = &path["hops"][0];
    assert_eq!(hop["kind"], "send", "{path}");
    hop
}

/// The hook is the one doctor says this kernel uses for the send hop.
fn assert_hook(hop: &Value) {
    let family = send_hook_family();
    let hook = hop["hook"].as_str().expect("hook");
    assert!(
        hook.starts_with(&format!("{family}:")),
        "hook {hook}, doctor says {family}"
    );
}

#[test]
fn nc_on_loopback_is_traced_with_its_pid() {
    require_root();
    // The command from the issue: `udptrace trace --json --port 5353 --count 1` while
    // `echo hi | nc -u -w1 127.0.0.1 5353` runs.
    let mut tracer = Tracer::start(&["--port", "5353", "--count", "1"]);
    let pid = nc_send(None, &[], "127.0.0.1", 5353);
    let path = tracer.one_path();
    let hop = send_hop(&path);
    assert_eq!(hop["pid"], pid, "{path}");
    assert_eq!(hop["comm"], "nc");
    assert_eq!(hop["uid"], 0);
    assert_eq!(hop["dst"], "127.0.0.1:5353");
    let src = hop["src"].as_str().unwrap();
    assert!(
        src.starts_with("127.0.0.1:") && !src.ends_with(":0"),
        "nc connects, so the source is bound: {src}"
    );
    assert_eq!(hop["len"], 3, "\"hi\\n\"");
    assert_eq!(hop["netns"], host_netns());
    assert!(hop["cgroup"].as_u64().unwrap() > 0);
    assert_hook(hop);
    assert_eq!(path["orig"]["dst"], "127.0.0.1:5353");
    assert_eq!(path["orig"], path["final"], "nothing rewrote it");
    // Nobody listens on 5353 here: out through lo and back in, dropped for want of a socket.
    assert_eq!(path["verdict"], "dropped", "{path}");
    assert_eq!(path["complete"], true);
    assert_eq!(
        hop_kinds(&path),
        ["send", "xmit", "ingress", "drop"],
        "{path}"
    );
    assert_eq!(path["hops"][1]["ifname"], "lo");
    assert_eq!(path["hops"][2]["ifname"], "lo");
    assert_eq!(path["hops"][3]["reason"], "NO_SOCKET");
    // RFC 3339 with nanoseconds.
    let ts = path["ts"].as_str().unwrap();
    assert!(
        ts.len() == "2026-11-26T12:44:12.790258866Z".len() && ts.ends_with('Z'),
        "{ts}"
    );
    assert!(
        tracer.wait(Duration::from_secs(5)).success(),
        "--count 1 exits 0"
    );
}

#[test]
fn unconnected_sendto_ipv4_in_a_namespace() {
    require_root();
    let net = Pair::new(&[]);
    let tracer = Tracer::start(&["--port", "20301", "--count", "1"]);
    let (pid, out) = py_send(&net.a, B4, 20301, "sendto", 37);
    let path = tracer.one_path();
    let hop = send_hop(&path);
    let sport = sent_port(&out);
    assert_eq!(hop["pid"], pid);
    assert_eq!(hop["comm"], "python3");
    assert_eq!(
        hop["dst"],
        format!("{B4}:20301"),
        "destination from the syscall"
    );
    assert_eq!(
        hop["src"],
        format!("0.0.0.0:{sport}"),
        "an unbound socket has no source address yet"
    );
    assert_eq!(hop["len"], 37);
    assert_eq!(
        hop["netns"],
        net.a.inode(),
        "the sender's namespace, not the host's"
    );
    assert_ne!(hop["netns"], host_netns());
    assert_hook(hop);
}

#[test]
fn unconnected_sendmsg_ipv6() {
    require_root();
    let net = Pair::new(&[]);
    let tracer = Tracer::start(&["--port", "20302", "--count", "1"]);
    let (pid, out) = py_send(&net.a, B6, 20302, "sendmsg", 1200);
    let path = tracer.one_path();
    let hop = send_hop(&path);
    let sport = sent_port(&out);
    assert_eq!(hop["pid"], pid);
    assert_eq!(hop["dst"], format!("[{B6}]:20302"));
    assert_eq!(hop["src"], format!("[::]:{sport}"));
    assert_eq!(hop["len"], 1200);
    assert_eq!(hop["netns"], net.a.inode());
}

#[test]
fn connected_ipv4_python_has_its_source() {
    require_root();
    let net = Pair::new(&[]);
    let tracer = Tracer::start(&["--port", "20303", "--count", "1"]);
    let (pid, out) = py_send(&net.a, B4, 20303, "connect", 5);
    let hop = send_hop(&tracer.one_path()).clone();
    let mut words = out.split_whitespace();
    let (sip, sport) = (words.next().unwrap(), words.next().unwrap());
    assert_eq!(sip, A4);
    assert_eq!(hop["pid"], pid);
    assert_eq!(hop["src"], format!("{A4}:{sport}"));
    assert_eq!(
        hop["dst"],
        format!("{B4}:20303"),
        "destination from the connected socket"
    );
    assert_eq!(hop["len"], 5);
}

#[test]
fn connected_ipv6_nc() {
    require_root();
    let net = Pair::new(&[]);
    let tracer = Tracer::start(&["--port", "20304", "--count", "1"]);
    let pid = nc_send(Some(&net.a), &["-6"], B6, 20304);
    let hop = send_hop(&tracer.one_path()).clone();
    assert_eq!(hop["pid"], pid);
    assert_eq!(hop["comm"], "nc");
    assert!(
        hop["src"]
            .as_str()
            .unwrap()
            .starts_with(&format!("[{A6}]:")),
        "{hop}"
    );
    assert_eq!(hop["dst"], format!("[{B6}]:20304"));
    assert_eq!(hop["len"], 3);
    assert_eq!(hop["netns"], net.a.inode());
}

#[test]
fn send_refused_by_netfilter_reports_the_errno() {
    require_root();
    let net = Pair::new(&[]);
    // Like a NetworkPolicy egress rule: the local OUTPUT chain drops, sendto gets EPERM.
    let mut ipt = net.a.cmd("iptables");
    ipt.args([
        "-A", "OUTPUT", "-p", "udp", "--dport", "20305", "-j", "DROP",
    ]);
    assert!(ipt.status().unwrap().success());
    let tracer = Tracer::start(&["--port", "20305", "--count", "1"]);
    let (pid, out) = py_send(&net.a, B4, 20305, "sendto", 9);
    assert_eq!(out, "errno 1", "ground truth: the application saw EPERM");
    let tracer_path = tracer.one_path();
    let hop = send_hop(&tracer_path).clone();
    assert_eq!(hop["pid"], pid);
    assert_eq!(hop["dst"], format!("{B4}:20305"));
    let path = tracer_path.clone();
    let drop = path["hops"].as_array().unwrap().last().unwrap();
    assert_eq!(
        (drop["kind"].as_str(), drop["reason"].as_str()),
        (Some("drop"), Some("NETFILTER_DROP")),
        "{path}"
    );
    assert_eq!(
        drop["netns"],
        net.a.inode(),
        "dropped in the sender's own namespace"
    );
    assert_eq!(path["verdict"], "dropped");
    if send_hop_reports_after_skbs() {
        assert_eq!(hop["errno"], 1, "{hop}");
        assert_eq!(hop["error"], "Operation not permitted");
        assert_eq!(hop["len"], 0);
    } else {
        eprintln!("errno not asserted: entry hooks (fentry/kprobe) run before the send fails");
    }
}

#[test]
fn filters_pick_the_datagrams_asked_for() {
    require_root();
    let net = Pair::new(&["10.203.0.3/24"]);
    let port = 20306;
    let p = &port.to_string();

    // --pid: a Python sender that waits for a go, so its pid is known before it sends.
    let mut waiting = net
        .a
        .cmd(PYTHON)
        .args(["-c", PY_SEND, B4, p, "sendto", "11", "wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let tracer = Tracer::start(&[
        "--port",
        p,
        "--pid",
        &waiting.id().to_string(),
        "--count",
        "1",
    ]);
    py_send(&net.a, B4, port, "sendto", 12); // another process: filtered out
    waiting.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(waiting.wait().unwrap().success());
    let hop = send_hop(&tracer.one_path()).clone();
    assert_eq!(hop["pid"], waiting.id());
    assert_eq!(hop["len"], 11);
    assert!(tracer.paths(1, Duration::from_millis(500)).is_empty());

    // --comm: nc's datagram, not python's.
    let tracer = Tracer::start(&["--port", p, "--comm", "nc", "--count", "1"]);
    py_send(&net.a, B4, port, "sendto", 13);
    let nc = nc_send(Some(&net.a), &[], B4, port);
    let hop = send_hop(&tracer.one_path()).clone();
    assert_eq!(
        (hop["comm"].as_str(), hop["pid"].as_u64()),
        (Some("nc"), Some(u64::from(nc)))
    );

    // --host: only the datagram to 10.203.0.3.
    let tracer = Tracer::start(&["--port", p, "--host", "10.203.0.3", "--count", "1"]);
    py_send(&net.a, B4, port, "sendto", 14);
    py_send(&net.a, "10.203.0.3", port, "sendto", 15);
    let hop = send_hop(&tracer.one_path()).clone();
    assert_eq!(hop["dst"], format!("10.203.0.3:{port}"));
    assert_eq!(hop["len"], 15);
}

#[test]
fn count_and_duration_stop_the_trace() {
    require_root();
    let mut tracer = Tracer::start(&["--port", "20307", "--duration", "1"]);
    let status = tracer.wait(Duration::from_secs(10));
    assert!(status.success(), "--duration exits 0: {}", tracer.stderr());
    assert!(
        tracer.stderr().contains("stopped (Duration)"),
        "{}",
        tracer.stderr()
    );

    let mut tracer = Tracer::start(&["--port", "20307", "--count", "2"]);
    for _ in 0..3 {
        nc_send(None, &[], "127.0.0.1", 20307);
    }
    assert_eq!(tracer.paths(3, Duration::from_secs(3)).len(), 2);
    assert!(tracer.wait(Duration::from_secs(5)).success());
}

#[test]
fn ctrl_c_stops_cleanly_and_removes_every_program() {
    require_root();
    // Programs already loaded (another udptrace on this host, say) are not ours to judge.
    let before = udptrace_program_ids();
    let tracer = Tracer::start(&["--port", "20308", "--netns", "all"]);
    let mine: std::collections::BTreeSet<u64> = udptrace_program_ids()
        .difference(&before)
        .copied()
        .collect();
    assert!(!mine.is_empty(), "programs loaded while tracing");
    assert!(links_to(&mine) > 0, "and linked");
    let status = tracer.stop();
    assert!(status.success(), "SIGINT is a clean stop: {status}");
    assert_eq!(
        wait_unloaded(&mine),
        Vec::<u64>::new(),
        "every program udptrace loaded is gone, and with them their links"
    );
}

#[test]
fn errors_say_what_to_do() {
    require_root();
    let (status, _, err) =
        udptrace(Command::new(udptrace_bin()).args(["trace", "--port", "70000"]));
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--port"), "{err}");

    // Without privileges: an unprivileged user, no capabilities.
    let (status, _, err) = udptrace(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .args([udptrace_bin(), "trace"]),
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("needs root, or CAP_BPF and CAP_PERFMON"),
        "{err}"
    );
    assert!(err.contains("Run it with sudo"), "{err}");
}

#[test]
fn doctor_explains_the_send_hook() {
    require_root();
    let (status, out, _) = udptrace(Command::new(udptrace_bin()).arg("doctor"));
    assert!(status.success(), "{out}");
    for needle in [
        "kernel",
        "BTF          /sys/kernel/btf/vmlinux: ok",
        "send hop     uses ",
        "tracing can run",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    // A hook the kernel has but whose program its verifier refused is our bug, whatever
    // other hook took over (a kernel without the hook says so before any verifier runs).
    let refused: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("not usable") && l.contains("processed") && l.contains("insns"))
        .collect();
    assert!(refused.is_empty(), "the verifier refused: {refused:#?}");
    // Every hook before the chosen one says why it was not usable.
    let family = send_hook_family();
    if family != "fentry" {
        assert!(
            out.contains("tried fentry:udp_sendmsg+udpv6_sendmsg: not usable: "),
            "{out}"
        );
    }
    if family == "tp_btf" || family == "raw_tracepoint" {
        assert!(
            out.contains("tried kprobe:udp_sendmsg+udpv6_sendmsg: not usable: "),
            "{out}"
        );
    }
}

/// sendmmsg(2) through ctypes: one call, one datagram per "host:port:size" argument.
const PY_SENDMMSG: &str = r#"
import ctypes, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
msgs = (mmsghdr * (len(sys.argv) - 1))()
keep = []
for i, arg in enumerate(sys.argv[1:]):
    host, port, size = arg.split(":")
    name = ctypes.create_string_buffer(struct.pack("<H", socket.AF_INET) + struct.pack(">H", int(port))
                                       + socket.inet_aton(host) + bytes(8), 16)
    data = ctypes.create_string_buffer(b"y" * int(size), int(size))
    iov = iovec(ctypes.cast(data, ctypes.c_void_p), int(size))
    keep += [name, data, iov]
    msgs[i].hdr = msghdr(ctypes.cast(name, ctypes.c_void_p), 16, ctypes.pointer(iov), 1, None, 0, 0)
sent = libc.sendmmsg(s.fileno(), msgs, len(sys.argv) - 1, 0)
print(sent, flush=True)
"#;

#[test]
fn sendmmsg_gives_each_datagram_its_destination() {
    require_root();
    let net = Pair::new(&["10.203.0.3/24"]);
    let tracer = Tracer::start(&["--port", "20309", "--count", "3"]);
    let child = net
        .a
        .cmd(PYTHON)
        .args(["-c", PY_SENDMMSG])
        .args([
            &format!("{B4}:20309:21"),
            "10.203.0.3:20309:22",
            &format!("{B4}:20309:23"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "3",
        "sendmmsg sent all three"
    );
    let paths = tracer.paths(3, Duration::from_secs(10));
    let seen: Vec<(String, u64, u64)> = paths
        .iter()
        .map(|p| {
            let hop = send_hop(p);
            (
                hop["dst"].as_str().unwrap().to_string(),
                hop["len"].as_u64().unwrap(),
                hop["pid"].as_u64().unwrap(),
            )
        })
        .collect();
    let pid = u64::from(pid);
    assert_eq!(
        seen,
        vec![
            (format!("{B4}:20309"), 21, pid),
            ("10.203.0.3:20309".to_string(), 22, pid),
            (format!("{B4}:20309"), 23, pid),
        ]
    );
}

/// Every send hook this kernel allows gives the same hop for the same datagram; the ones it
/// does not allow are named with doctor's reason. The tracepoint hook is checked with each
/// source of unconnected sends' destinations: the cgroup hooks, and the syscall tracepoints.
#[test]
fn every_usable_send_hook_reports_the_same_fields() {
    require_root();
    let families = ["fentry", "kprobe", "tp_btf", "raw_tracepoint"];
    let variants = [
        (0, "", ""),
        (1, "", ""),
        (2, "", "destinations of unconnected sends from cgroup:"),
        (3, "", "destinations of unconnected sends from cgroup:"),
        (
            3,
            "cgroup",
            "destinations of unconnected sends from syscalls:",
        ),
    ];
    let mut checked = 0;
    for (i, (at, also_disabled, note)) in variants.into_iter().enumerate() {
        let family = families[at];
        // Disable the better hooks so this one is tried.
        let mut disabled = families[..at].to_vec();
        if !also_disabled.is_empty() {
            disabled.push(also_disabled);
        }
        let disable = disabled.join(",");
        let (_, doctor, _) = udptrace(
            Command::new(udptrace_bin())
                .arg("doctor")
                .env("UDPTRACE_DISABLE_HOOKS", &disable),
        );
        let uses = doctor
            .lines()
            .find(|l| l.starts_with("send hop"))
            .unwrap_or_default();
        if !uses.contains(&format!("uses {family}:")) {
            let why = doctor
                .lines()
                .find(|l| l.contains(&format!("tried {family}:")))
                .unwrap_or("not tried");
            eprintln!("skipped {family}: this kernel cannot: {}", why.trim());
            continue;
        }
        if !doctor.contains(note) {
            let why = doctor.lines().find(|l| l.contains("note: ")).unwrap_or("");
            eprintln!("skipped {family} with {note:?}: {}", why.trim());
            continue;
        }
        let net = Pair::new(&[]);
        let port = 20310 + i as u16;
        let mut tracer = Tracer::start_env(
            &["--port", &port.to_string(), "--count", "2"],
            &[("UDPTRACE_DISABLE_HOOKS", &disable)],
        );
        let nc = nc_send(Some(&net.a), &[], B4, port);
        let (py, out) = py_send(&net.a, B6, port, "sendto", 64);
        let paths = tracer.paths(2, Duration::from_secs(10));
        assert_eq!(paths.len(), 2, "{family}: {}", tracer.stderr());
        let (h1, h2) = (send_hop(&paths[0]), send_hop(&paths[1]));
        for h in [h1, h2] {
            assert!(
                h["hook"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{family}:")),
                "{h}"
            );
            assert_eq!(h["netns"], net.a.inode());
        }
        assert_eq!(
            (h1["pid"].as_u64(), h1["comm"].as_str()),
            (Some(u64::from(nc)), Some("nc"))
        );
        assert!(
            h1["src"].as_str().unwrap().starts_with(&format!("{A4}:")),
            "{h1}"
        );
        assert_eq!(h1["dst"], format!("{B4}:{port}"));
        assert_eq!(h1["len"], 3);
        let sport = sent_port(&out);
        assert_eq!(
            (h2["pid"].as_u64(), h2["comm"].as_str()),
            (Some(u64::from(py)), Some("python3"))
        );
        assert_eq!(h2["src"], format!("[::]:{sport}"));
        assert_eq!(h2["dst"], format!("[{B6}]:{port}"));
        assert_eq!(h2["len"], 64);
        assert!(tracer.wait(Duration::from_secs(5)).success());
        checked += 1;
    }
    assert!(checked > 0, "no send hook works on this kernel");
}

/// A receiver whose reading thread has a name of its own (as servers' worker threads do).
const PY_THREAD_READER: &str = r#"
import ctypes, socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
def read():
    ctypes.CDLL(None).prctl(15, b"udp-reader", 0, 0, 0)
    print("ready", flush=True)
    while True:
        s.recv(2048)
threading.Thread(target=read, daemon=True).start()
threading.Event().wait()
"#;

/// dig sends its query from a worker thread (`isc-net-0000`), and the receiver reads in a
/// thread of its own: both hops name the process people know (`process_name`), the thread
/// stays in `comm`, and `--comm dig` finds the query by the process's name.
#[test]
fn threads_are_named_with_their_process() {
    require_root();
    let pair = Pair::new(&[]);
    // The reader starts reading once tracing runs: an fexit program (6.1's recv hook) does
    // not see the return of a call that began before it was attached.
    let tracer = Tracer::start(&["--netns", "all", "--comm", "dig"]);
    let (mut rx, _) = spawn_ready(
        pair.b
            .cmd(PYTHON)
            .args(["-c", PY_THREAD_READER, B4, "5399"]),
    );
    let dig = pair
        .a
        .cmd("dig")
        .args([
            "+tries=1",
            "+time=1",
            "-p",
            "5399",
            &format!("@{B4}"),
            "example.test",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let dig_pid = dig.id();
    let paths = tracer.paths(1, Duration::from_secs(10));
    let _ = rx.kill();
    let _ = rx.wait();
    let path = &paths[0];
    let send = send_hop(path);
    assert_eq!(
        (send["pid"].as_u64(), send["process_name"].as_str()),
        (Some(u64::from(dig_pid)), Some("dig")),
        "{path}"
    );
    if send["comm"] != "dig" {
        assert_ne!(send["tid"], send["pid"], "a thread of its own: {send}");
    }
    assert_eq!(path["verdict"], "delivered", "{path}");
    let deliver = path["hops"].as_array().unwrap().last().unwrap();
    assert_eq!(
        (
            deliver["process_name"].as_str(),
            deliver["comm"].as_str(),
            deliver["pid"].as_u64()
        ),
        (
            Some("python3"),
            Some("udp-reader"),
            Some(u64::from(rx.id()))
        ),
        "{deliver}"
    );
    assert_ne!(deliver["tid"], deliver["pid"], "{deliver}");
    let mut dig = dig;
    let _ = dig.wait();
}
