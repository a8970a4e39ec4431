//! The pod network's host side against the real kernel: network
//! namespaces, a veth as CNI's bridge plugin makes it, and a tap joined to
//! it by tc. Needs root (namespaces, taps, tc); it fails, never skips,
//! without it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use moat_shim::network::{NetworkError, PodNetwork};

/// The uid and gid the taps are given to.
const JAIL_OWNER: (u32, u32) = (64001, 64002);

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the network tests need root (network namespaces, taps, tc); run them as root"
    );
}

/// A network namespace for one test, deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("moat-nt-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "-n", &self.0];
        all.extend_from_slice(args);
        sh(&all)
    }
    fn tc(&self, args: &[&str]) -> String {
        let mut all = vec!["tc", "-n", &self.0];
        all.extend_from_slice(args);
        sh(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn mac_of(ns: &Netns, dev: &str) -> String {
    let out = ns.ip(&["-o", "link", "show", dev]);
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {out}"))
        .to_string()
}

fn parse_mac(mac: &str) -> [u8; 6] {
    let mut out = [0u8; 6];
    for (i, part) in mac.split(':').enumerate() {
        out[i] = u8::from_str_radix(part, 16).expect("hex MAC");
    }
    out
}

/// Opens tap `name` inside `ns` as moat-vmm does (tap, no packet info,
/// 12-byte virtio-net headers), non-blocking.
fn open_tap(ns: &Netns, name: &str) -> File {
    let ns_file = File::open(ns.path()).expect("open the netns");
    let name = name.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        let mut request = [0u8; 40];
        request[..name.len()].copy_from_slice(name.as_bytes());
        let flags: i16 = 0x0002 | 0x1000 | 0x4000; // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        request[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes one 40-byte struct ifreq.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54ca, request.as_mut_ptr()) };
        assert!(
            rc >= 0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        let header_size: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), 0x4004_54d8, &header_size) };
        assert!(
            rc >= 0,
            "TUNSETVNETHDRSZ: {}",
            std::io::Error::last_os_error()
        );
        tun
    })
    .join()
    .expect("tap thread")
}

/// Reads frames from the tap until one satisfies `wanted` or 10 s pass;
/// returns it without its virtio-net header.
fn read_frame(tap: &mut File, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65562];
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match tap.read(&mut buf) {
            Ok(n) if n > 12 + 14 => {
                let frame = buf[12..n].to_vec();
                if wanted(&frame) {
                    return frame;
                }
                seen.push(format!("{:02x?}", &frame[12..14]));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("read the tap: {e}"),
        }
    }
    panic!("no such frame on the tap within 10 s (saw ethertypes {seen:?})");
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

#[test]
fn a_veth_is_carried_through_a_tap_both_ways_and_detach_leaves_nothing() {
    require_root();
    let pod = Netns::new("pod");
    let peer = Netns::new("peer");
    // As CNI's bridge plugin leaves a pod: eth0, addresses, a default route.
    pod.ip(&[
        "link", "add", "name", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "vpeer",
        "netns", &peer.0,
    ]);
    pod.ip(&["addr", "add", "10.213.0.2/24", "dev", "eth0"]);
    pod.ip(&["addr", "add", "fd00:213::2/64", "dev", "eth0", "nodad"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", "10.213.0.1"]);
    peer.ip(&["addr", "add", "10.213.0.1/24", "dev", "vpeer"]);
    peer.ip(&["link", "set", "vpeer", "up"]);
    let pod_mac = mac_of(&pod, "eth0");
    let peer_mac = mac_of(&peer, "vpeer");

    let network = PodNetwork::attach(&pod.path(), JAIL_OWNER).expect("attach");
    assert_eq!(network.endpoints.len(), 1, "{network:?}");
    let endpoint = &network.endpoints[0];
    assert_eq!(endpoint.name, "eth0");
    assert_eq!(endpoint.mac, pod_mac);
    assert_eq!(endpoint.mtu, 1400);
    assert_eq!(endpoint.tap, "tap0_moat");
    assert_eq!(endpoint.guest_device, "eth0");
    // The jailed, unprivileged moat-vmm may open the tap.
    let details = pod.ip(&["-d", "link", "show", "tap0_moat"]);
    assert!(
        details.contains("user 64001") && details.contains("group 64002"),
        "the tap's owner and group: {details}"
    );
    assert!(
        endpoint.addresses.contains(&"10.213.0.2/24".to_string())
            && endpoint.addresses.contains(&"fd00:213::2/64".to_string())
            && endpoint.addresses.len() == 2,
        "addresses (no link-local): {:?}",
        endpoint.addresses
    );
    assert!(
        network
            .routes
            .iter()
            .any(|r| r.destination == "default" && r.gateway == "10.213.0.1" && r.device == "eth0"),
        "default route: {:?}",
        network.routes
    );
    assert!(
        network
            .routes
            .iter()
            .all(|r| r.destination != "10.213.0.0/24"),
        "the subnet route is the guest kernel's to make: {:?}",
        network.routes
    );
    assert_eq!(
        network.vmm_net_args(),
        vec![format!("id=eth0,tap=tap0_moat,mac={pod_mac}")]
    );
    assert!(
        pod.ip(&["-o", "link", "show", "tap0_moat"])
            .contains("mtu 1400"),
        "the tap takes the veth's MTU"
    );
    for (dev, to) in [("eth0", "tap0_moat"), ("tap0_moat", "eth0")] {
        let filters = pod.tc(&["filter", "show", "dev", dev, "ingress"]);
        assert!(
            filters.contains("protocol all")
                && filters.contains("mirred")
                && filters.contains(&format!("Redirect to device {to}")),
            "{dev}'s ingress redirects everything to {to}:\n{filters}"
        );
    }

    // The peer asks who has the pod's address: the request reaches the tap
    // (the VM's side). The "guest" answers through the tap: the answer
    // reaches the peer, which then sends its datagram to the tap too.
    let mut tap = open_tap(&pod, "tap0_moat");
    // A datagram from the peer: the kernel asks for the pod's MAC first
    // and holds the datagram until it has an answer.
    let peer_ns = File::open(peer.path()).expect("open the peer netns");
    std::thread::spawn(move || {
        nix::sched::setns(&peer_ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let socket = std::net::UdpSocket::bind("10.213.0.1:0").expect("bind in the peer");
        socket
            .send_to(b"moat", "10.213.0.2:9")
            .expect("send to the pod");
    })
    .join()
    .expect("peer thread");
    let request = read_frame(&mut tap, |f| {
        ethertype(f) == 0x0806 && f[38..42] == [10, 213, 0, 2]
    });
    assert_eq!(&request[6..12], &parse_mac(&peer_mac), "from the peer");
    let mut reply = Vec::new();
    reply.extend_from_slice(&[0u8; 12]); // virtio-net header: nothing offloaded
    reply.extend_from_slice(&parse_mac(&peer_mac));
    reply.extend_from_slice(&parse_mac(&pod_mac));
    reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&parse_mac(&pod_mac));
    reply.extend_from_slice(&[10, 213, 0, 2]);
    reply.extend_from_slice(&parse_mac(&peer_mac));
    reply.extend_from_slice(&[10, 213, 0, 1]);
    tap.write_all(&reply)
        .expect("write the ARP reply to the tap");
    let datagram = read_frame(&mut tap, |f| ethertype(f) == 0x0800 && f[23] == 17);
    assert_eq!(
        &datagram[0..6],
        &parse_mac(&pod_mac),
        "the datagram goes to the pod's MAC"
    );
    assert_eq!(&datagram[30..34], &[10, 213, 0, 2], "to the pod's address");
    assert_eq!(&datagram[42..46], b"moat", "with its payload");
    drop(tap);

    PodNetwork::detach(&pod.path()).expect("detach");
    let links = pod.ip(&["-o", "link"]);
    assert!(!links.contains("tap0_moat"), "tap left behind:\n{links}");
    let qdiscs = pod.tc(&["qdisc", "show", "dev", "eth0"]);
    assert!(
        !qdiscs.contains("ingress"),
        "ingress qdisc left on eth0:\n{qdiscs}"
    );
    PodNetwork::detach(&pod.path()).expect("detach is idempotent");
    drop(pod);
    let gone = PathBuf::from("/run/netns/moat-nt-gone");
    PodNetwork::detach(&gone).expect("a namespace that is gone has nothing to remove");
}

#[test]
fn an_interface_without_a_mac_is_refused_and_nothing_is_left() {
    require_root();
    let pod = Netns::new("nomac");
    pod.ip(&[
        "link", "add", "name", "eth0", "type", "veth", "peer", "name", "eth9",
    ]);
    pod.ip(&["tuntap", "add", "dev", "tun0", "mode", "tun"]);
    let err = PodNetwork::attach(&pod.path(), JAIL_OWNER).expect_err("a tun cannot be carried");
    assert!(
        matches!(&err, NetworkError::NotEthernet { name, .. } if name == "tun0"),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("tun0") && message.contains(&pod.0),
        "{message}"
    );
    let links = pod.ip(&["-o", "link"]);
    assert!(!links.contains("_moat"), "half-made taps left:\n{links}");
    let qdiscs = pod.tc(&["qdisc", "show"]);
    assert!(!qdiscs.contains("ingress"), "qdiscs left:\n{qdiscs}");
}

#[test]
fn more_interfaces_than_a_vm_takes_are_refused_and_nothing_is_left() {
    require_root();
    let pod = Netns::new("many");
    for i in 0..=moat_shim::network::MAX_INTERFACES {
        let (a, b) = (format!("eth{i}"), format!("peer{i}"));
        pod.ip(&[
            "link", "add", "name", &a, "type", "veth", "peer", "name", &b,
        ]);
    }
    let err = PodNetwork::attach(&pod.path(), JAIL_OWNER).expect_err("too many interfaces");
    assert!(matches!(err, NetworkError::TooMany { .. }), "{err}");
    assert!(err.to_string().contains("at most"), "{err}");
    let links = pod.ip(&["-o", "link"]);
    assert!(!links.contains("_moat"), "taps left:\n{links}");
}

#[test]
fn a_missing_namespace_is_named() {
    let err = PodNetwork::attach(
        std::path::Path::new("/run/netns/moat-no-such-ns"),
        JAIL_OWNER,
    )
    .expect_err("no namespace");
    assert!(err.to_string().contains("moat-no-such-ns"), "{err}");
}
