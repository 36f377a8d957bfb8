//! Delivery: the path ends at the receiving socket, naming the process that reads it, and
//! `final` is what that process sees.

use udptrace_testkit::*;

/// A receiver that prints "ready", then the source address of the first datagram, and
/// keeps running a moment as a server would (a reader already blocked in recvmsg when
/// tracing starts is named from the socket's holder, which must still exist).
const PY_RECV: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
print("ready", flush=True)
data, addr = s.recvfrom(2048)
print(addr[0], addr[1], len(data), flush=True)
time.sleep(2)
"#;

#[test]
fn a_datagram_read_by_python_is_delivered_to_it() {
    require_root();
    for (dst, port) in [(B4, 20601u16), (B6, 20602)] {
        let net = Pair::new(&[]);
        let p = port.to_string();
        let (mut receiver, mut lines) =
            spawn_ready(net.b.cmd(PYTHON).args(["-c", PY_RECV, dst, &p]));
        let tracer = Tracer::start(&["--netns", "all", "--port", &p, "--count", "1"]);
        let nc = nc_send(Some(&net.a), &[], dst, port);
        let seen = lines.next().unwrap().unwrap(); // "<src ip> <src port> <len>"
        let path = tracer.one_path();
        let stderr = tracer.stderr();
        let _ = receiver.kill();
        let _ = receiver.wait();

        assert_eq!(path["verdict"], "delivered", "{path}");
        assert_eq!(path["complete"], true);
        let kinds = hop_kinds(&path);
        assert_eq!(
            (
                kinds.first().map(String::as_str),
                kinds.last().map(String::as_str)
            ),
            (Some("send"), Some("deliver")),
            "{path}"
        );
        let deliver = path["hops"].as_array().unwrap().last().unwrap();
        assert_eq!(
            deliver["pid"],
            receiver.id(),
            "the reading process: {deliver}\n{stderr}"
        );
        assert_eq!(deliver["comm"], "python3");
        assert_eq!(deliver["netns"], net.b.inode());
        assert_eq!(deliver["len"], 3);
        assert_eq!(path["hops"][0]["pid"], nc);
        // final is the receiving socket's view: exactly what the receiver printed.
        let mut words = seen.split_whitespace();
        let (ip, sport) = (words.next().unwrap(), words.next().unwrap());
        let expected = if ip.contains(':') {
            format!("[{ip}]:{sport}")
        } else {
            format!("{ip}:{sport}")
        };
        assert_eq!(path["final"]["src"], expected);
        assert_eq!(
            path["final"]["dst"],
            if dst.contains(':') {
                format!("[{dst}]:{port}")
            } else {
                format!("{dst}:{port}")
            }
        );
    }
}
