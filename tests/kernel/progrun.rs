//! The ingress program on crafted packets with `BPF_PROG_TEST_RUN`: no
//! namespaces or traffic, the real program and the maps the agent's
//! datapath writes. The kernel runs the program on an skb owned by a
//! throwaway socket in the test's own cgroup, so the test's cgroup is made
//! a workload ("web") in the plan; peers are remote workloads by address.
//! Also here: the agent's netlink address book against a real namespace.
use std::{net::IpAddr, path::PathBuf};

use palisade::{
    agent::Planner,
    config::Config,
    datapath::{Datapath as _, bpfsys::prog_test_run, kernel::KernelDatapath},
    inventory::{Inputs, RemoteWorkload, Workload},
    policy::{PolicySet, load::parse_str},
};

const PASS: u32 = 1;
const DROP: u32 = 0;

const WEB: [u8; 4] = [10, 9, 0, 1];
const CLIENT: [u8; 4] = [10, 9, 0, 2];
const OTHER: [u8; 4] = [10, 9, 0, 3];

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: prod}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{protocol: TCP, port: 443}]\n";

/// A cgroup the programs are attached under (made here, removed on drop)
/// and the datapath over it; the datapath goes first.
struct Bench {
    datapath: Option<KernelDatapath>,
    root: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        drop(self.datapath.take());
        let _ = std::fs::remove_dir(&self.root);
    }
}

impl Bench {
    fn new() -> Bench {
        let mount = palisade::discovery::cgroup2_mount().unwrap();
        let root = mount.join(format!("palisade-test-progrun-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let mut bench = Bench {
            datapath: None,
            root,
        };
        let config = Config::parse(std::path::Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        bench.datapath = Some(KernelDatapath::load(&bench.root, &config.maps, 4096, None).unwrap());
        bench
    }

    fn datapath(&mut self) -> &mut KernelDatapath {
        self.datapath.as_mut().unwrap()
    }

    /// Plans and applies: this test's cgroup is `prod/web`, the peers are
    /// `client` and `other`, with `policy` (YAML) or none.
    fn apply(&mut self, policy: Option<&str>) {
        let config = Config::parse(std::path::Path::new("t.yaml"), "cgroupRoot: x\n").unwrap();
        let policies = PolicySet {
            policies: policy.map_or_else(Vec::new, |p| {
                parse_str("p.yaml", p)
                    .unwrap()
                    .into_iter()
                    .map(std::sync::Arc::new)
                    .collect()
            }),
            files: Vec::new(),
        };
        let remote = |name: &str, ip: [u8; 4]| RemoteWorkload {
            namespace: "prod".into(),
            name: name.into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            ips: vec![IpAddr::from(ip)],
            ports: Vec::new(),
        };
        let inputs = Inputs {
            workloads: vec![Workload {
                cgroup_id: own_cgroup_id(),
                cgroup_path: "prod/web".into(),
                namespace: "prod".into(),
                name: "web".into(),
                labels: [("app".to_owned(), "web".to_owned())].into(),
                ips: vec![IpAddr::from(WEB)],
                ports: Vec::new(),
                own_netns: true,
            }],
            remote: palisade::inventory::RemoteChanges::all([
                remote("client", CLIENT),
                remote("other", OTHER),
            ]),
            ..Inputs::default()
        };
        let plan = Planner::new(config, false).plan(inputs, &policies);
        self.datapath().apply(&plan.desired).unwrap();
    }

    fn run(&mut self, packet: &[u8]) -> u32 {
        let fd = self
            .datapath()
            .loaded_program("palisade_ingress")
            .expect("the ingress program is loaded");
        prog_test_run(fd, packet).unwrap()
    }
}

/// The cgroup id (cgroup2 inode) of this process.
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup2 line");
    let mount = palisade::discovery::cgroup2_mount().unwrap();
    std::fs::metadata(mount.join(path.trim_start_matches('/')))
        .unwrap()
        .ino()
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// Ethernet + IPv4 (20 bytes, no options) + `l4`.
fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend([0x08, 0x00]); // EtherType IPv4
    let total = u16::try_from(20 + l4.len()).unwrap();
    p.extend([0x45, 0]);
    p.extend(total.to_be_bytes());
    p.extend([0, 1, 0x40, 0, 64, protocol, 0, 0]);
    p.extend(src);
    p.extend(dst);
    p.extend(l4);
    p
}

/// Ethernet + IPv6 from fd00::3 to fd00::1 + `ext` extension headers
/// (destination options, 8 bytes each) + TCP SYN to 443.
fn ipv6_with_extensions(ext: usize) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend([0x86, 0xdd]); // EtherType IPv6
    let l4 = tcp(443, SYN);
    let payload = u16::try_from(ext * 8 + l4.len()).unwrap();
    p.extend([0x60, 0, 0, 0]);
    p.extend(payload.to_be_bytes());
    p.extend([if ext > 0 { 60 } else { 6 }, 64]);
    p.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    p.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    for i in 0..ext {
        let next = if i + 1 < ext { 60 } else { 6 };
        p.extend([next, 0, 1, 4, 0, 0, 0, 0]); // PadN over the 6 option bytes
    }
    p.extend(l4);
    p
}

/// A TCP header from port 40000 to `port` with `flags`.
fn tcp(port: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(40000u16.to_be_bytes());
    t.extend(port.to_be_bytes());
    t.extend([0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
    t.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]); // offset 5, flags, window, csum, urg
    t
}

#[test]
fn the_ingress_program_judges_crafted_packets() {
    if !super::kernel_tests_enabled() {
        return;
    }
    let mut bench = Bench::new();
    // Without policy: the same packets pass (the technique reaches the program).
    bench.apply(None);
    assert_eq!(bench.run(&ipv4(OTHER, WEB, 6, &tcp(443, SYN))), PASS);
    assert_eq!(bench.run(&ipv4(CLIENT, WEB, 6, &tcp(80, SYN))), PASS);
    assert_eq!(bench.run(&ipv6_with_extensions(5)), PASS);

    bench.apply(Some(POLICY));
    let before = bench.datapath().counters().unwrap();
    // A connection from the allowed peer to the allowed port passes.
    assert_eq!(bench.run(&ipv4(CLIENT, WEB, 6, &tcp(443, SYN))), PASS);
    // Another peer, or another port: dropped at the SYN.
    assert_eq!(bench.run(&ipv4(OTHER, WEB, 6, &tcp(443, SYN))), DROP);
    assert_eq!(bench.run(&ipv4(CLIENT, WEB, 6, &tcp(80, SYN))), DROP);
    // A UDP datagram to the TCP-only port: dropped.
    let udp = [0x9c, 0x40, 0x01, 0xbb, 0, 8, 0, 0];
    assert_eq!(bench.run(&ipv4(CLIENT, WEB, 17, &udp)), DROP);
    // A segment that opens nothing belongs to a flow judged at its SYN.
    assert_eq!(bench.run(&ipv4(OTHER, WEB, 6, &tcp(443, ACK))), PASS);
    let after = bench.datapath().counters().unwrap();
    assert_eq!(after.ingress_deny - before.ingress_deny, 3);

    // Packets the program cannot parse are dropped on an enforced workload.
    let unparseable = [
        // The IPv4 header says TCP, the packet ends after it.
        ipv4(OTHER, WEB, 6, &[]),
        // IHL 4 (< 5 words): not an IPv4 header.
        {
            let mut p = ipv4(CLIENT, WEB, 6, &tcp(443, SYN));
            p[14] = 0x44;
            p
        },
        // TCP cut in the middle of its ports.
        ipv4(CLIENT, WEB, 6, &[0x9c]),
        // TCP ports but no flags byte.
        ipv4(CLIENT, WEB, 6, &tcp(443, SYN)[..8]),
        // More IPv6 extension headers than the program walks (4).
        ipv6_with_extensions(5),
    ];
    for (i, p) in unparseable.iter().enumerate() {
        assert_eq!(bench.run(p), DROP, "unparseable packet {i}");
    }
    // Each is counted and audited, not dropped silently.
    let parsed = bench.datapath().counters().unwrap();
    let n = unparseable.len() as u64;
    assert_eq!(parsed.unparseable - after.unparseable, n);
    assert_eq!(parsed.ingress_deny - after.ingress_deny, n);
    assert_eq!(parsed.events_emitted - after.events_emitted, n);
    // Within the walk's bound an IPv6 packet is judged by policy: a peer of
    // no identity is refused, and it is not unparseable.
    assert_eq!(bench.run(&ipv6_with_extensions(4)), DROP);
    let judged = bench.datapath().counters().unwrap();
    assert_eq!(judged.unparseable, parsed.unparseable);
    assert_eq!(judged.ingress_deny - parsed.ingress_deny, 1);
}

/// A network namespace with a veth end and a process in it (all removed on drop).
struct Netns {
    name: String,
    child: std::process::Child,
}

impl Netns {
    fn new() -> Netns {
        let name = format!("palisade-test-nl{}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(ok.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let host_end = format!("pnl{}", std::process::id() % 100_000);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "w0", "netns", &name,
        ]);
        ip(&["-n", &name, "link", "set", "w0", "up"]);
        ip(&["-n", &name, "addr", "add", "10.99.0.1/24", "dev", "w0"]);
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "sleep", "60"])
            .spawn()
            .unwrap();
        Netns { name, child }
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        assert!(
            std::process::Command::new("ip")
                .args(&all)
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Deleting the namespace removes the veth pair with it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A workload's addresses are read once per namespace and again only when
/// the namespace says its addresses changed (netlink notifications), and a
/// change wakes the loop at once (the epoll set over the sockets).
#[test]
fn workload_addresses_follow_the_namespaces_changes() {
    use std::os::unix::fs::MetadataExt as _;
    if !super::kernel_tests_enabled() {
        return;
    }
    let ns = Netns::new();
    // `ip netns exec` runs `sleep` in the namespace under the same pid.
    let path = PathBuf::from(format!("/proc/{}/ns/net", ns.child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let key = loop {
        let meta = std::fs::metadata(&path).unwrap();
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        if meta.ino() != own.ino() {
            break (meta.dev(), meta.ino());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process never entered its namespace"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let wakeup = palisade::netlink::AddressWakeup::new().unwrap();
    let mut book = palisade::netlink::AddressBook::new(Some(wakeup.clone()));
    let ips = |book: &mut palisade::netlink::AddressBook| {
        let v = book.workload_addresses(key, &path).unwrap();
        book.end_round();
        v.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    // Whether the wakeup fires within `wait` (the loop's "addresses changed").
    let woken = |wait_ms: u64| {
        runtime
            .block_on(tokio::time::timeout(
                std::time::Duration::from_millis(wait_ms),
                wakeup.changed(),
            ))
            .is_ok()
    };
    assert_eq!(ips(&mut book), ["10.99.0.1"]);
    assert!(!woken(300), "woken with nothing changed");
    // Another subnet: deleting 10.99.0.1 (a primary) would take its
    // secondaries with it.
    ns.ip(&["addr", "add", "10.98.0.2/24", "dev", "w0"]);
    assert!(woken(5_000), "an added address did not wake the loop");
    ns.ip(&["addr", "add", "fd99::2/64", "dev", "w0", "nodad"]);
    assert_eq!(ips(&mut book), ["10.98.0.2", "10.99.0.1", "fd99::2"]);
    assert!(!woken(300), "woken again after the change was read");
    ns.ip(&["addr", "del", "10.99.0.1/24", "dev", "w0"]);
    assert!(woken(5_000), "a removed address did not wake the loop");
    assert_eq!(ips(&mut book), ["10.98.0.2", "fd99::2"]);
    assert_eq!(book.len(), 1, "one socket per namespace");
    // A namespace not looked at in a round is forgotten (its socket closed).
    book.end_round();
    assert!(book.is_empty());
}
