//! The ingress hop: tc ingress on the devices of covered namespaces. It must coexist with
//! other tc programs and filters (CNIs use tc), never change a datagram's fate, follow
//! devices and namespaces that appear while tracing, and remove exactly what it added.

use std::time::Duration;

use serde_json::Value;
use udptrace_testkit::*;

fn tc(ns: &Netns, args: &[&str]) -> String {
    let out = ns.cmd("tc").args(args).output().expect("tc");
    assert!(
        out.status.success(),
        "tc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn last_hop(path: &Value) -> &Value {
    path["hops"].as_array().unwrap().last().unwrap()
}

/// A receiver in `b` bound to both ports; prints "ready", then "<port> <len>" per datagram
/// until nothing came for 1.5 s after the first (or for a minute before it).
fn receiver(net: &Pair, ports: [u16; 2]) -> (std::process::Child, impl Iterator<Item = String>) {
    let (child, lines) = spawn_ready(net.b.cmd(PYTHON).args([
        "-c",
        &format!(
            "import select,socket\n\
                 ss=[socket.socket(socket.AF_INET,socket.SOCK_DGRAM) for _ in range(2)]\n\
                 ss[0].bind(('{B4}',{}))\nss[1].bind(('{B4}',{}))\n\
                 print('ready',flush=True)\n\
                 t=60\n\
                 while True:\n\
                 \x20r,_,_=select.select(ss,[],[],t)\n\
                 \x20if not r: break\n\
                 \x20t=1.5\n\
                 \x20for s in r: print(s.getsockname()[1],len(s.recv(100)),flush=True)\n\
                 print('done',flush=True)",
            ports[0], ports[1]
        ),
    ]));
    (child, lines.map_while(Result::ok))
}

/// One eBPF instruction: opcode, registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | (src << 4)) << 8
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

fn bpf(cmd: i64, attr: &mut [u8; 128]) -> i64 {
    // SAFETY: `attr` is a zeroed bpf_attr of sufficient size with the command's fields set.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) }
}

/// A CNI's tc program, as another loader would install it: BPF_PROG_TYPE_SCHED_CLS,
/// direct action, dropping IPv4 UDP to port 20801 and passing the rest on; pinned at
/// `pin` for `tc filter ... bpf object-pinned`.
fn pin_cni_program(pin: &std::path::Path) {
    #[rustfmt::skip]
    let prog = [
        insn(0x61, 2, 1, 76, 0),      // r2 = skb->data
        insn(0x61, 3, 1, 80, 0),      // r3 = skb->data_end
        insn(0xbf, 4, 2, 0, 0),       // r4 = r2
        insn(0x07, 4, 0, 0, 38),      // r4 += 38 (Ethernet, IPv4, UDP ports)
        insn(0x2d, 4, 3, 8, 0),       // if r4 > r3 goto pass
        insn(0x69, 5, 2, 12, 0),      // r5 = ethertype
        insn(0x55, 5, 0, 6, 0x0008),  // if r5 != htons(ETH_P_IP) goto pass
        insn(0x71, 5, 2, 23, 0),      // r5 = IP protocol
        insn(0x55, 5, 0, 4, 17),      // if r5 != UDP goto pass
        insn(0x69, 5, 2, 36, 0),      // r5 = UDP destination port
        insn(0x55, 5, 0, 2, 0x4151),  // if r5 != htons(20801) goto pass
        insn(0xb7, 0, 0, 0, 2),       // r0 = TC_ACT_SHOT
        insn(0x95, 0, 0, 0, 0),       // exit
        insn(0xb7, 0, 0, 0, -1),      // pass: r0 = TC_ACT_UNSPEC
        insn(0x95, 0, 0, 0, 0),       // exit
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&3u32.to_ne_bytes()); // BPF_PROG_TYPE_SCHED_CLS
    attr[4..8].copy_from_slice(&(prog.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(prog.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..56].copy_from_slice(b"cni_drop");
    let fd = bpf(5, &mut attr); // BPF_PROG_LOAD
    assert!(
        fd >= 0,
        "loading the CNI program: {}",
        std::io::Error::last_os_error()
    );
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    let pinned = bpf(6, &mut attr); // BPF_OBJ_PIN
    assert!(pinned == 0, "pinning: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor; the pin keeps the program.
    unsafe { libc::close(fd as i32) };
}

/// A bpffs of the test's own, unmounted (with its pins) when dropped.
struct Bpffs(std::path::PathBuf);

impl Bpffs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("udpt-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        sh(&["mount", "-t", "bpf", "bpf", dir.to_str().unwrap()]);
        Self(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A CNI-like tc setup on the receiving veth: a clsact qdisc with a BPF program (from
/// another loader) dropping UDP to one port. With udptrace attached (tcx, or a clsact filter of its own), that port is
/// still dropped (by tc, as the kernel reports) and the other still delivered; afterwards
/// the CNI's qdisc and filter are there, and nothing of ours is, anywhere.
#[test]
fn tc_ingress_coexists_with_other_filters_and_never_changes_a_verdict() {
    require_root();
    let fs = Bpffs::new();
    let pin = fs.0.join("cni_drop");
    pin_cni_program(&pin);
    for env in [vec![], vec![("UDPTRACE_DISABLE_HOOKS", "tcx")]] {
        let net = Pair::new(&[]);
        tc(&net.b, &["qdisc", "add", "dev", "ut-b", "clsact"]);
        tc(
            &net.b,
            &[
                "filter",
                "add",
                "dev",
                "ut-b",
                "ingress",
                "prio",
                "10",
                "bpf",
                "object-pinned",
                pin.to_str().unwrap(),
                "da",
            ],
        );
        let tcx = uses_tcx(&env);
        let (mut rx, mut got) = receiver(&net, [20801, 20802]);
        let before = udptrace_program_ids();
        let tracer = Tracer::start_env(&["--netns", "all", "--host", B4, "--count", "2"], &env);
        let mine: std::collections::BTreeSet<u64> = udptrace_program_ids()
            .difference(&before)
            .copied()
            .collect();
        py_send(&net.a, B4, 20801, "sendto", 11);
        py_send(&net.a, B4, 20802, "sendto", 12);
        let mut paths = tracer.paths(2, Duration::from_secs(10));
        assert_eq!(paths.len(), 2, "{}", tracer.stderr());
        paths.sort_by_key(|p| p["orig"]["dst"].as_str().unwrap().to_string());
        let (shot, passed) = (&paths[0], &paths[1]);
        let hook = if tcx {
            "tcx:ingress"
        } else {
            "tc:clsact-ingress"
        };

        assert_eq!(
            hop_kinds(shot),
            ["send", "xmit", "ingress", "drop"],
            "{env:?}: {shot}"
        );
        assert_eq!(shot["hops"][2]["hook"], hook);
        assert_eq!(shot["hops"][2]["netns"], net.b.inode());
        assert_eq!(last_hop(shot)["netns"], net.b.inode());
        if kernel_has_drop_reason("TC_INGRESS") {
            assert_eq!(last_hop(shot)["reason"], "TC_INGRESS", "{shot}");
        }
        assert_eq!(
            hop_kinds(passed),
            ["send", "xmit", "ingress", "deliver"],
            "{passed}"
        );
        assert_eq!(passed["hops"][2]["hook"], hook);
        // Ground truth: the receiver got only the datagram tc let through.
        let seen: Vec<String> = got.by_ref().take_while(|l| l != "done").collect();
        let _ = rx.wait();
        assert_eq!(seen, ["20802 12"]);

        assert!(tracer.stop().success());
        let qdiscs = tc(&net.b, &["qdisc", "show", "dev", "ut-b"]);
        assert!(qdiscs.contains("clsact"), "the CNI's qdisc stays: {qdiscs}");
        let filters = tc(&net.b, &["filter", "show", "dev", "ut-b", "ingress"]);
        assert!(
            filters.contains("cni_drop"),
            "the CNI's filter stays: {filters}"
        );
        assert!(!filters.contains("ingress_"), "ours is gone: {filters}");
        // Where we had to add a clsact qdisc, it is gone again.
        let qdiscs = tc(&net.a, &["qdisc", "show", "dev", "ut-a"]);
        assert!(!qdiscs.contains("clsact"), "{qdiscs}");
        assert!(!mine.is_empty());
        assert_eq!(wait_unloaded(&mine), Vec::<u64>::new(), "left loaded");
    }
}

/// Devices created while tracing get the program at once (rtnetlink tells), and so do the
/// devices of namespaces created while tracing.
#[test]
fn devices_and_namespaces_that_appear_while_tracing_are_covered() {
    require_root();
    let net = Pair::new(&[]);
    let tracer = Tracer::start(&["--netns", "all", "--port", "20811", "--count", "2"]);
    // A second link between the two covered namespaces, used straight away.
    sh(&[
        "ip",
        "link",
        "add",
        "ut-x",
        "netns",
        &net.a.name,
        "type",
        "veth",
        "peer",
        "name",
        "ut-y",
        "netns",
        &net.b.name,
    ]);
    net.a.ip(&["addr", "add", "10.207.0.1/24", "dev", "ut-x"]);
    net.b.ip(&["addr", "add", "10.207.0.2/24", "dev", "ut-y"]);
    net.a.ip(&["link", "set", "ut-x", "up"]);
    net.b.ip(&["link", "set", "ut-y", "up"]);
    std::thread::sleep(Duration::from_millis(300));
    py_send(&net.a, "10.207.0.2", 20811, "sendto", 5);
    // A namespace that did not exist when tracing started.
    let late = Netns::new("late");
    sh(&[
        "ip",
        "link",
        "add",
        "ut-l",
        "netns",
        &net.a.name,
        "type",
        "veth",
        "peer",
        "name",
        "ut-m",
        "netns",
        &late.name,
    ]);
    net.a.ip(&["addr", "add", "10.208.0.1/24", "dev", "ut-l"]);
    late.ip(&["addr", "add", "10.208.0.2/24", "dev", "ut-m"]);
    net.a.ip(&["link", "set", "ut-l", "up"]);
    late.ip(&["link", "set", "ut-m", "up"]);
    // Namespaces are looked for every second.
    std::thread::sleep(Duration::from_millis(1500));
    py_send(&net.a, "10.208.0.2", 20811, "sendto", 6);
    let paths = tracer.paths(2, Duration::from_secs(10));
    assert_eq!(paths.len(), 2, "{}", tracer.stderr());
    for (path, dev, ns) in [(&paths[0], "ut-y", &net.b), (&paths[1], "ut-m", &late)] {
        let ingress = path["hops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["kind"] == "ingress")
            .unwrap_or_else(|| panic!("no ingress hop on {dev}: {path}"));
        assert_eq!(ingress["ifname"], dev);
        assert_eq!(ingress["netns"], ns.inode());
    }
}

/// A tap device hands what it transmits to the program reading it (a VM, a VPN): the
/// datagram has left this kernel. The reader here is a Python process on the tap.
#[test]
fn transmitting_on_a_tap_leaves_the_host() {
    require_root();
    let _ = std::process::Command::new("modprobe").arg("tun").status();
    let ns = Netns::new("tap");
    // The "VM": opens ut-tap, prints ready, then the UDP port of every IPv4/UDP frame it
    // reads, and at the end how many went to port 20821.
    let (mut vm, lines) = spawn_ready(ns.cmd(PYTHON).args([
        "-c",
        "import fcntl,os,struct,select\n\
             fd=os.open('/dev/net/tun',os.O_RDWR)\n\
             fcntl.ioctl(fd,0x400454ca,struct.pack('16sH',b'ut-tap',0x0002|0x1000))\n\
             print('ready',flush=True)\n\
             n=0\n\
             while select.select([fd],[],[],5)[0]:\n\
             \x20f=os.read(fd,2048)\n\
             \x20if len(f)>=38 and f[12:14]==b'\\x08\\x00' and f[23]==17:\n\
             \x20\x20p=int.from_bytes(f[36:38],'big')\n\
             \x20\x20print('port',p,flush=True)\n\
             \x20\x20n+=p==20821\n\
             print('frames',n,flush=True)",
    ]));
    let lines = lines.map_while(Result::ok);
    ns.ip(&["addr", "add", "10.209.0.1/24", "dev", "ut-tap"]);
    ns.ip(&["link", "set", "ut-tap", "up"]);
    ns.ip(&[
        "neigh",
        "add",
        "10.209.0.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "ut-tap",
    ]);
    // The carrier comes up when the reader attaches, and the kernel activates the device's
    // queue a moment later (linkwatch; slow under an emulated CPU): until then a datagram
    // would go nowhere. Wait for a real qdisc and the lower layer up.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let link = String::from_utf8_lossy(
            &ns.cmd("ip")
                .args(["-o", "link", "show", "ut-tap"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        if link.contains("LOWER_UP") && !link.contains("qdisc noop") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ut-tap never came up: {link}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Even then the first frames may wait in a stopped queue under an emulated CPU: the
    // tap's way out is proven open once the reader got a warm-up datagram.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    'warm: loop {
        py_send(&ns, "10.209.0.2", 20820, "sendto", 1);
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            if line == "port 20820" {
                break 'warm;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tap's reader never got a frame"
        );
    }
    let tracer = Tracer::start(&["--netns", "all", "--port", "20821", "--count", "1"]);
    let (pid, _) = py_send(&ns, "10.209.0.2", 20821, "sendto", 9);
    let path = tracer.one_path();
    assert_eq!(path["verdict"], "left-host", "{path}");
    assert_eq!(path["complete"], true);
    assert_eq!(hop_kinds(&path), ["send", "xmit"], "{path}");
    assert_eq!(path["hops"][0]["pid"], pid);
    let xmit = &path["hops"][1];
    assert_eq!(
        (xmit["ifname"].as_str(), xmit["ifkind"].as_str()),
        (Some("ut-tap"), Some("tun"))
    );
    let explain = path["explain"].as_str().unwrap();
    assert!(
        explain.starts_with("left the host on ut-tap") && explain.contains("10.209.0.2:20821"),
        "{explain}"
    );
    // Ground truth: the reader of the tap got the frame.
    let frames = rx
        .iter()
        .find(|l| l.starts_with("frames"))
        .unwrap_or_default();
    let _ = vm.wait();
    assert_eq!(frames, "frames 1");
}
