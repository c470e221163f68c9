//! A world of pods: one network namespace and one cgroup per pod, the pods'
//! `eth0` joined by a bridge in a hub namespace. IPv4 and IPv6 addresses on
//! one link, no default route, no way out.
use std::{
    ffi::CString,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

static NEXT_WORLD: AtomicU32 = AtomicU32::new(0);
/// The gateway's MAC address in node worlds (locally administered).
const NODE_MAC: &str = "02:70:61:6c:00:01";
static REAP: Once = Once::new();

/// What a pod is.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    /// The pod's cgroup relative to the world's root; default `<namespace>/<name>`.
    pub cgroup: Option<String>,
}

impl PodSpec {
    pub fn new(namespace: &str, name: &str, tcp: &[u16], udp: &[u16]) -> PodSpec {
        PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            tcp: tcp.to_vec(),
            udp: udp.to_vec(),
            cgroup: None,
        }
    }
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A pod that exists.
#[derive(Debug)]
pub struct Pod {
    pub spec: PodSpec,
    pub index: u8,
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    server: Option<Child>,
}

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount")
}

pub struct World {
    pub tag: String,
    pub hub: String,
    /// The cgroup subtree this world owns; agents attach here.
    pub cgroup_root: PathBuf,
    /// A sibling subtree for processes that must stay outside the agent's root.
    pub outside_root: PathBuf,
    pub pods: Vec<Pod>,
    subnet: u8,
    /// The hub is a node (see [`World::make_node`]).
    node: bool,
}

impl World {
    /// An empty world: the hub namespace with its bridge, and the cgroup roots.
    pub fn new() -> anyhow::Result<World> {
        REAP.call_once(reap_stale_worlds);
        let n = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        let tag = format!("pal{}x{n}", std::process::id());
        let mount = cgroup2_mount()?;
        let world = World {
            hub: format!("{tag}-hub"),
            cgroup_root: mount.join(format!("palisade-test-{tag}")),
            outside_root: mount.join(format!("palisade-test-{tag}-outside")),
            tag,
            pods: Vec::new(),
            node: false,
            // A distinct /24 (and /64) per world, so parallel worlds never meet.
            subnet: (100
                + (std::process::id() as u8)
                    .wrapping_mul(7)
                    .wrapping_add(n as u8)
                    % 100),
        };
        ip(&["netns", "add", &world.hub])?;
        ip(&["-n", &world.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &world.hub, "link", "set", "br0", "up"])?;
        std::fs::create_dir_all(&world.cgroup_root)
            .with_context(|| format!("mkdir {}", world.cgroup_root.display()))?;
        std::fs::create_dir_all(&world.outside_root)?;
        // On any error above, `world` is dropped and cleans up what exists.
        Ok(world)
    }

    pub fn ipv4(&self, index: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, index)
    }

    pub fn ipv6(&self, index: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd77,
            0,
            0,
            u16::from(self.subnet),
            0,
            0,
            0,
            u16::from(index),
        )
    }

    /// Makes the hub namespace a node, the way a Kubernetes node is built
    /// around its pods: the bridge gets the gateway addresses (index 1), the
    /// hub forwards, and every pod (now and later) routes the world's subnet
    /// and the Service range through the gateway, so that pod-to-pod and
    /// pod-to-Service traffic crosses the node's network stack (where
    /// kube-proxy's rules live) in both directions. Still no route out.
    pub fn make_node(&mut self) -> anyhow::Result<()> {
        let (gw4, gw6) = (self.gateway_v4(), self.gateway_v6());
        // Neighbour solicitations reach every pod at once, whatever MLD
        // reports the bridge has seen so far.
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        // A fixed gateway MAC, so pods can know it (a bridge takes its
        // lowest port's address otherwise, which changes as pods come).
        ip(&["-n", &self.hub, "link", "set", "br0", "address", NODE_MAC])?;
        ip(&["-n", &self.hub, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &self.hub,
            "addr",
            "add",
            &format!("{gw4}/24"),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            &self.hub,
            "addr",
            "add",
            &format!("{gw6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        in_netns(
            &self.hub,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.br0.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.br0.send_redirects=0",
            ],
        )?;
        self.node = true;
        for pod in &self.pods {
            self.hairpin(pod.index)?;
            self.route_via_gateway(&pod.netns)?;
            let addrs = [format!("{}/24", pod.ipv4), format!("{}/64", pod.ipv6)];
            self.static_neighbours(&pod.netns, &addrs)?;
        }
        Ok(())
    }

    /// The node's address on the pods' bridge (the CNI gateway).
    pub fn gateway_v4(&self) -> Ipv4Addr {
        self.ipv4(1)
    }

    pub fn gateway_v6(&self) -> Ipv6Addr {
        self.ipv6(1)
    }

    /// Service (ClusterIP) addresses of this world: 10.96.<subnet>.<index>.
    pub fn service_v4(&self, index: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, self.subnet, index)
    }

    pub fn service_v6(&self, index: u8) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd96,
            0,
            0,
            u16::from(self.subnet),
            0,
            0,
            0,
            u16::from(index),
        )
    }

    /// Permanent neighbour entries between the node and a pod (both ways),
    /// so that no probe waits on neighbour discovery: a solicitation lost
    /// while a namespace is still settling costs a full second otherwise.
    fn static_neighbours(&self, netns: &str, addrs: &[String]) -> anyhow::Result<()> {
        let link = in_netns(netns, &["ip", "-o", "link", "show", "eth0"])?;
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .context("pod eth0 has no MAC address")?
            .to_owned();
        for a in addrs {
            let addr = a.split('/').next().unwrap_or(a);
            ip(&[
                "-n",
                &self.hub,
                "neigh",
                "replace",
                addr,
                "lladdr",
                &mac,
                "dev",
                "br0",
                "nud",
                "permanent",
            ])?;
        }
        for gw in [self.gateway_v4().to_string(), self.gateway_v6().to_string()] {
            ip(&[
                "-n",
                netns,
                "neigh",
                "replace",
                &gw,
                "lladdr",
                NODE_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// The bridge port sends frames back where they came from, as CNI bridge
    /// plugins configure it for kube-proxy: a pod reaching its own Service
    /// (hairpin) gets its own packets back.
    fn hairpin(&self, index: u8) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.hub,
            "link",
            "set",
            &format!("v{index}"),
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])
    }

    fn route_via_gateway(&self, netns: &str) -> anyhow::Result<()> {
        // The node forwards between pods on one bridge port set; its ICMP
        // redirects would make pods bypass it (and its conntrack).
        in_netns(
            netns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.eth0.accept_redirects=0",
                "net.ipv4.conf.eth0.accept_redirects=0",
            ],
        )?;
        let (gw4, gw6) = (self.gateway_v4().to_string(), self.gateway_v6().to_string());
        let net4 = format!("10.77.{}.0/24", self.subnet);
        let net6 = format!("fd77:0:0:{:x}::/64", self.subnet);
        let svc4 = format!("10.96.{}.0/24", self.subnet);
        let svc6 = format!("fd96:0:0:{:x}::/64", self.subnet);
        // The on-link prefix routes go: everything crosses the gateway.
        ip(&["-n", netns, "route", "del", &net4, "dev", "eth0"])?;
        ip(&["-n", netns, "-6", "route", "del", &net6, "dev", "eth0"])?;
        ip(&[
            "-n", netns, "route", "add", &gw4, "dev", "eth0", "scope", "link",
        ])?;
        ip(&["-n", netns, "-6", "route", "add", &gw6, "dev", "eth0"])?;
        for net in [&net4, &svc4] {
            ip(&["-n", netns, "route", "add", net, "via", &gw4, "dev", "eth0"])?;
        }
        for net in [&net6, &svc6] {
            ip(&[
                "-n", netns, "-6", "route", "add", net, "via", &gw6, "dev", "eth0",
            ])?;
        }
        Ok(())
    }

    /// Counts the packets of every IP protocol that reach `pod`'s network
    /// namespace (an nftables counter at prerouting, before any socket):
    /// what a denied peer "saw" is measured where it arrives, not at the
    /// sender. Only the link's own chatter is left out (IPv6 neighbour
    /// discovery and multicast listener messages, IGMP), which no workload
    /// sends. TCP and UDP are also counted on their own.
    pub fn count_arrivals(&self, pod: &Pod) -> anyhow::Result<()> {
        let rules = "add table inet palisade_count\n\
                     add chain inet palisade_count pre { type filter hook prerouting priority -400; policy accept; }\n\
                     add rule inet palisade_count pre meta l4proto tcp counter comment \"tcp\"\n\
                     add rule inet palisade_count pre meta l4proto udp counter comment \"udp\"\n\
                     add rule inet palisade_count pre icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report } accept\n\
                     add rule inet palisade_count pre meta l4proto igmp accept\n\
                     add rule inet palisade_count pre counter comment \"all\"\n";
        in_netns_with_input(&pod.netns, &["nft", "-f", "-"], rules)
    }

    /// Packets of every protocol counted by [`World::count_arrivals`] so far.
    pub fn arrivals(&self, pod: &Pod) -> anyhow::Result<u64> {
        self.arrivals_of(pod, "all")
    }

    /// Packets of one transport (`tcp`, `udp`) counted so far: where an
    /// answer's ICMP error (a port unreachable from the peer's kernel) is
    /// not the point.
    pub fn arrivals_of(&self, pod: &Pod, which: &str) -> anyhow::Result<u64> {
        let out = in_netns(
            &pod.netns,
            &["nft", "list", "chain", "inet", "palisade_count", "pre"],
        )?;
        let tag = format!("comment \"{which}\"");
        out.lines()
            .find(|l| l.contains(&tag))
            .and_then(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "packets")
                    .nth(1)
                    .and_then(|n| n.parse().ok())
            })
            .with_context(|| format!("no {which} counter in the arrival chain"))
    }

    /// Runs a command in the hub (the node's network namespace), as a
    /// process outside every pod cgroup; fails with its stderr.
    pub fn on_node(&self, args: &[&str]) -> anyhow::Result<String> {
        in_netns(&self.hub, args)
    }

    /// Runs a command in the hub with `input` on its stdin (iptables-restore, nft -f -).
    pub fn on_node_with_input(&self, args: &[&str], input: &str) -> anyhow::Result<()> {
        in_netns_with_input(&self.hub, args, input)
    }

    /// Adds a pod: namespace, veth into the bridge, addresses, cgroup, and
    /// its server process (which also makes its addresses discoverable).
    pub fn add_pod(&mut self, spec: PodSpec) -> anyhow::Result<&Pod> {
        self.add_pod_at(spec, None)
    }

    /// Like `add_pod`, with the pod's one address given (as a /32 or /128;
    /// `route_all` then makes every pod reach every other on the link).
    pub fn add_pod_at(
        &mut self,
        spec: PodSpec,
        addr: Option<std::net::IpAddr>,
    ) -> anyhow::Result<&Pod> {
        let index = u8::try_from(self.pods.len() + 10).context("too many pods")?;
        let netns = format!("{}-{index}", self.tag);
        let cgroup = match &spec.cgroup {
            Some(rel) => self.cgroup_root.join(rel),
            None => self.cgroup_root.join(&spec.namespace).join(&spec.name),
        };
        let (v4, v6) = match addr {
            None => (self.ipv4(index), self.ipv6(index)),
            Some(std::net::IpAddr::V4(a)) => (a, Ipv6Addr::UNSPECIFIED),
            Some(std::net::IpAddr::V6(a)) => (Ipv4Addr::UNSPECIFIED, a),
        };
        self.pods.push(Pod {
            spec,
            index,
            netns: netns.clone(),
            cgroup: cgroup.clone(),
            ipv4: v4,
            ipv6: v6,
            server: None,
        });
        let addrs = match addr {
            None => vec![format!("{v4}/24"), format!("{v6}/64")],
            Some(a) => vec![format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 })],
        };
        self.plug(&netns, index, &addrs)?;
        std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        let pod = self.pods.last_mut().context("pod just added")?;
        start_server(pod)?;
        self.pods.last().context("pod just added")
    }

    /// Deletes the cgroup root and every pod cgroup and makes them again,
    /// as a runtime rebuilding the hierarchy would: the pods' processes stop
    /// and start again in the new cgroups (a socket keeps the cgroup it was
    /// made in, so a process moved back would keep listening from the
    /// deleted one). `between` runs while the root does not exist.
    pub fn recreate_cgroups(&mut self, between: impl FnOnce()) -> anyhow::Result<()> {
        for pod in &mut self.pods {
            if let Some(child) = &mut pod.server {
                kill(child);
            }
            pod.server = None;
        }
        remove_cgroup_tree(&self.cgroup_root);
        anyhow::ensure!(
            !self.cgroup_root.exists(),
            "{} still exists",
            self.cgroup_root.display()
        );
        between();
        for pod in &mut self.pods {
            std::fs::create_dir_all(&pod.cgroup)
                .with_context(|| format!("mkdir {}", pod.cgroup.display()))?;
            start_server(pod)?;
        }
        Ok(())
    }

    /// On-link routes from every pod to every other pod's address (for pods
    /// added with `add_pod_at`, whose addresses share no subnet). Routes only
    /// name other pods' addresses: nothing leads out of the world.
    pub fn route_all(&self) -> anyhow::Result<()> {
        let addrs: Vec<String> = self
            .pods
            .iter()
            .flat_map(|p| [p.ipv4.to_string(), p.ipv6.to_string()])
            .filter(|a| a != "0.0.0.0" && a != "::")
            .collect();
        for pod in &self.pods {
            for a in &addrs {
                if *a != pod.ipv4.to_string() && *a != pod.ipv6.to_string() {
                    ip(&["-n", &pod.netns, "route", "replace", a, "dev", "eth0"])?;
                }
            }
        }
        Ok(())
    }

    /// Like `route_all`, in a node world ([`World::make_node`]): the node
    /// routes to every pod's address over the bridge, and each pod reaches
    /// every other pod and the Service range through the gateway.
    pub fn route_all_via_node(&self) -> anyhow::Result<()> {
        let gw4 = self.gateway_v4().to_string();
        let gw6 = self.gateway_v6().to_string();
        let svc4 = format!("10.96.{}.0/24", self.subnet);
        let svc6 = format!("fd96:0:0:{:x}::/64", self.subnet);
        let addrs: Vec<std::net::IpAddr> = self
            .pods
            .iter()
            .flat_map(|p| [std::net::IpAddr::V4(p.ipv4), std::net::IpAddr::V6(p.ipv6)])
            .filter(|a| !a.is_unspecified())
            .collect();
        for a in &addrs {
            ip(&[
                "-n",
                &self.hub,
                "route",
                "replace",
                &a.to_string(),
                "dev",
                "br0",
            ])?;
        }
        for pod in &self.pods {
            ip(&[
                "-n", &pod.netns, "route", "replace", &gw4, "dev", "eth0", "scope", "link",
            ])?;
            ip(&[
                "-n", &pod.netns, "-6", "route", "replace", &gw6, "dev", "eth0",
            ])?;
            ip(&[
                "-n", &pod.netns, "route", "replace", &svc4, "via", &gw4, "dev", "eth0",
            ])?;
            ip(&[
                "-n", &pod.netns, "-6", "route", "replace", &svc6, "via", &gw6, "dev", "eth0",
            ])?;
            for a in &addrs {
                if *a == std::net::IpAddr::V4(pod.ipv4) || *a == std::net::IpAddr::V6(pod.ipv6) {
                    continue;
                }
                let gw = if a.is_ipv4() { &gw4 } else { &gw6 };
                ip(&[
                    "-n",
                    &pod.netns,
                    "route",
                    "replace",
                    &a.to_string(),
                    "via",
                    gw,
                    "dev",
                    "eth0",
                ])?;
            }
        }
        Ok(())
    }

    pub fn pod(&self, key: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.spec.key() == key)
            .unwrap_or_else(|| panic!("no pod {key} in the world"))
    }

    /// Runs a probe from `from`'s cgroup and namespace; returns its word
    /// (`ok`, `eperm`, `refused`, `timeout`, `error …`).
    pub fn probe(
        &self,
        from: &Pod,
        proto: &str,
        to: std::net::IpAddr,
        port: u16,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        self.probe_in(&from.cgroup, &from.netns, proto, to, port, timeout)
    }

    /// Runs `palisade-testbed flood` from `from`: COUNT TCP connects to
    /// `to:port`; returns how many were refused with EPERM.
    pub fn flood(
        &self,
        from: &Pod,
        to: std::net::IpAddr,
        port: u16,
        count: u32,
    ) -> anyhow::Result<u32> {
        let mut cmd = Command::new(crate::bin_dir().join("palisade-testbed"));
        cmd.args([
            "flood",
            &to.to_string(),
            &port.to_string(),
            &count.to_string(),
        ]);
        enter(&mut cmd, &from.cgroup, &from.netns)?;
        let out = cmd.output().context("running palisade-testbed flood")?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("flood output")
    }

    /// Runs `palisade-testbed ARGS` in `from`'s cgroup and namespace; its stdout.
    pub fn testbed(&self, from: &Pod, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(crate::bin_dir().join("palisade-testbed"));
        cmd.args(args);
        enter(&mut cmd, &from.cgroup, &from.netns)?;
        let out = cmd.output().context("running palisade-testbed")?;
        if !out.status.success() {
            bail!(
                "palisade-testbed {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `palisade-testbed ARGS` in any cgroup and a pod's namespace; its
    /// stdout whatever its exit status (the word is the answer).
    pub fn testbed_in(&self, cgroup: &Path, netns: &str, args: &[&str]) -> anyhow::Result<String> {
        testbed_in(cgroup, netns, args)
    }

    /// Starts `palisade-testbed ARGS` in `pod`'s cgroup and namespace and
    /// waits for its `ready` line; the process is killed when the value drops.
    pub fn spawn_testbed(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<Spawned> {
        self.spawn_testbed_in(&pod.cgroup, &pod.netns, args)
    }

    /// `palisade-testbed ARGS` in any cgroup (say, the outside root), in a
    /// pod's network namespace; returns once it printed `ready`.
    pub fn spawn_testbed_in(
        &self,
        cgroup: &Path,
        netns: &str,
        args: &[&str],
    ) -> anyhow::Result<Spawned> {
        let mut cmd = Command::new(crate::bin_dir().join("palisade-testbed"));
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        enter(&mut cmd, cgroup, netns)?;
        let mut child = cmd.spawn().context("starting palisade-testbed")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let mut buf = [0u8; 6];
        let spawned = Spawned(child);
        std::io::Read::read_exact(&mut stdout, &mut buf).context("did not start")?;
        Ok(spawned)
    }

    /// A probe from any cgroup, in a pod's network namespace.
    pub fn probe_in(
        &self,
        cgroup: &Path,
        netns: &str,
        proto: &str,
        to: std::net::IpAddr,
        port: u16,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        probe_in(cgroup, netns, proto, to, port, timeout)
    }

    /// Adds a network namespace on the bridge without a pod cgroup (for
    /// senders the agent must not know by cgroup). Returns (netns, index).
    pub fn add_bare_netns(&mut self, name: &str) -> anyhow::Result<(String, u8)> {
        let index = u8::try_from(self.pods.len() + 200).context("too many")?;
        let netns = format!("{}-{name}", self.tag);
        self.pods.push(Pod {
            spec: PodSpec::new("-", name, &[], &[]),
            index,
            netns: netns.clone(),
            cgroup: self.outside_root.clone(),
            ipv4: self.ipv4(index),
            ipv6: self.ipv6(index),
            server: None,
        });
        let addrs = [
            format!("{}/24", self.ipv4(index)),
            format!("{}/64", self.ipv6(index)),
        ];
        self.plug(&netns, index, &addrs)?;
        Ok((netns, index))
    }
}

impl World {
    /// Creates network namespace `netns`, plugs it into the bridge with a veth
    /// pair and gives its `eth0` the addresses `addrs` (IPv6 without DAD).
    fn plug(&self, netns: &str, index: u8, addrs: &[String]) -> anyhow::Result<()> {
        let veth = format!("v{index}");
        ip(&["netns", "add", netns])?;
        if self.node {
            // No tentative link-local address: a pod whose first packets go
            // through the gateway must answer its neighbour solicitations at once.
            in_netns(
                netns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.all.accept_dad=0",
                ],
            )?;
        }
        ip(&[
            "link", "add", &veth, "netns", &self.hub, "type", "veth", "peer", "name", "eth0",
            "netns", netns,
        ])?;
        ip(&["-n", &self.hub, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        for a in addrs {
            let mut args = vec!["-n", netns, "addr", "add", a.as_str(), "dev", "eth0"];
            if a.contains(':') {
                args.push("nodad");
            }
            ip(&args)?;
        }
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        if self.node {
            self.hairpin(index)?;
            if addrs.iter().any(|a| a.ends_with("/24")) {
                self.route_via_gateway(netns)?;
            }
            self.static_neighbours(netns, addrs)?;
        }
        Ok(())
    }
}

/// Runs `args` in network namespace `netns` with `input` on its stdin
/// (iptables-restore, nft -f -); fails with its stderr and the input.
fn in_netns_with_input(netns: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {args:?} in {netns}"))?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} (in {netns}): {}\ninput:\n{input}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `args` in network namespace `netns` (`ip netns exec`: for tools
/// that need no cgroup view); its stdout, or an error with its stderr.
pub fn in_netns(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .with_context(|| format!("running {args:?} in {netns}"))?;
    if !out.status.success() {
        bail!(
            "{} (in {netns}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Makes `cmd` start inside `cgroup` and network namespace `netns`: the child
/// moves itself into the cgroup first, then enters the namespace with setns
/// (not `ip netns exec`, which remounts /sys and hides the cgroup tree).
fn enter(cmd: &mut Command, cgroup: &Path, netns: &str) -> anyhow::Result<()> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_encoded_bytes())?;
    let ns = File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening netns {netns}"))?;
    // SAFETY: only async-signal-safe calls (open, write, close, setns) run
    // between fork and exec; the namespace file stays open in the parent
    // (moved into the closure) until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if ok != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Starts the pod's listeners (`palisade-testbed serve`) in its cgroup and
/// namespace and waits until they are bound.
fn start_server(pod: &mut Pod) -> anyhow::Result<()> {
    let mut args = vec!["serve".to_owned()];
    if !pod.spec.tcp.is_empty() {
        args.push("--tcp".into());
        args.push(join(&pod.spec.tcp));
    }
    if !pod.spec.udp.is_empty() {
        args.push("--udp".into());
        args.push(join(&pod.spec.udp));
    }
    let mut cmd = Command::new(crate::bin_dir().join("palisade-testbed"));
    cmd.args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    enter(&mut cmd, &pod.cgroup, &pod.netns)?;
    let mut child = cmd.spawn().context("starting palisade-testbed serve")?;
    // Wait for "ready": the listeners are bound.
    let mut stdout = child.stdout.take().context("server stdout")?;
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut buf).context("server did not start")?;
    pod.server = Some(child);
    Ok(())
}

fn kill(child: &mut Child) {
    // By pid, our own child only.
    let _ = child.kill();
    let _ = child.wait();
}

/// Removes a cgroup directory tree bottom-up, waiting briefly for killed
/// processes to leave.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for pod in &mut self.pods {
            if let Some(child) = &mut pod.server {
                kill(child);
            }
        }
        for pod in &self.pods {
            let _ = ip(&["netns", "del", &pod.netns]);
        }
        let _ = ip(&["netns", "del", &self.hub]);
        remove_cgroup_tree(&self.cgroup_root);
        remove_cgroup_tree(&self.outside_root);
    }
}

/// `palisade-testbed ARGS` in any cgroup and network namespace (under
/// /run/netns), as a process the pod's runtime would have started there; its
/// stdout whatever its exit status (the word is the answer).
pub fn testbed_in(cgroup: &Path, netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(crate::bin_dir().join("palisade-testbed"));
    cmd.args(args);
    enter(&mut cmd, cgroup, netns)?;
    let out = cmd.output().context("running palisade-testbed")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `palisade-testbed probe` from any cgroup and network namespace (under
/// /run/netns); its word (`ok`, `eperm`, `refused`, `timeout`, `error …`).
pub fn probe_in(
    cgroup: &Path,
    netns: &str,
    proto: &str,
    to: std::net::IpAddr,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<String> {
    let (to, port, ms) = (
        to.to_string(),
        port.to_string(),
        timeout.as_millis().to_string(),
    );
    let args = ["probe", proto, &to, &port, "--timeout-ms", &ms];
    Ok(testbed_in(cgroup, netns, &args)?.trim().to_owned())
}

/// A process started in a pod; killed (by its pid) when dropped.
pub struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

/// Names of network namespaces that belong to any Palisade test world.
pub fn leftover_netns() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("pal") && n.contains('x'))
                .collect()
        })
        .unwrap_or_default()
}

/// The pid in a world tag (`pal<pid>x<n>`) at the start of `name`, after `prefix`.
fn tag_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?.strip_prefix("pal")?;
    let (pid, after) = rest.split_once('x')?;
    after
        .starts_with(|c: char| c.is_ascii_digit())
        .then_some(())?;
    pid.parse().ok()
}

/// True when the world of `pid` can no longer clean up after itself.
fn owner_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what worlds of test processes that no longer exist left behind
/// (a run killed with SIGKILL cannot run its `Drop`): their network
/// namespaces, cgroup subtrees and bpffs pin directories. Only names of the
/// world's own pattern are touched, and a cgroup that still holds a process is
/// left alone and named.
pub fn reap_stale_worlds() {
    let mut reaped = Vec::new();
    if let Ok(mount) = cgroup2_mount()
        && let Ok(rd) = std::fs::read_dir(&mount)
    {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = tag_pid(&name, "palisade-test-") else {
                continue;
            };
            if !owner_gone(pid) {
                continue;
            }
            let dir = e.path();
            if cgroup_tree_has_processes(&dir) {
                eprintln!(
                    "palisade-tests: {} is left from a test run (pid {pid}) that is gone, \
                     but still holds processes; not removing it",
                    dir.display()
                );
                continue;
            }
            remove_cgroup_tree(&dir);
            reaped.push(dir.display().to_string());
        }
    }
    // Hierarchies of a hybrid layout that podman (the real-node tests) wrote to.
    if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
        for hierarchy in rd.flatten() {
            let Ok(dirs) = std::fs::read_dir(hierarchy.path()) else {
                continue;
            };
            for e in dirs.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if tag_pid(&name, "palisade-test-").is_some_and(owner_gone)
                    && !cgroup_tree_has_processes(&e.path())
                {
                    remove_cgroup_tree(&e.path());
                    reaped.push(e.path().display().to_string());
                }
            }
        }
    }
    for name in leftover_netns() {
        if tag_pid(&name, "").is_some_and(owner_gone) && ip(&["netns", "del", &name]).is_ok() {
            reaped.push(format!("netns {name}"));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if tag_pid(&name, "palisade-test-").is_some_and(owner_gone)
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                reaped.push(e.path().display().to_string());
            }
        }
    }
    if !reaped.is_empty() {
        eprintln!(
            "palisade-tests: removed what killed test runs left behind: {}",
            reaped.join(", ")
        );
    }
}

fn cgroup_tree_has_processes(dir: &Path) -> bool {
    let here = std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    here || std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            e.file_type().is_ok_and(|t| t.is_dir()) && cgroup_tree_has_processes(&e.path())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::tag_pid;

    #[test]
    fn world_tags_name_their_process() {
        assert_eq!(
            tag_pid("palisade-test-pal8697x0", "palisade-test-"),
            Some(8697)
        );
        assert_eq!(
            tag_pid("palisade-test-pal8697x12-outside", "palisade-test-"),
            Some(8697)
        );
        assert_eq!(tag_pid("pal8697x0-hub", ""), Some(8697));
        assert_eq!(tag_pid("pal8697x3-10", ""), Some(8697));
        // Not a world's name: left alone.
        assert_eq!(tag_pid("palisade-test-other", "palisade-test-"), None);
        assert_eq!(tag_pid("palette", ""), None);
        assert_eq!(tag_pid("pal12xy", ""), None);
        assert_eq!(tag_pid("palisade.slice", "palisade-test-"), None);
    }
}
