//! Real nodes, as close to a cluster as one machine allows: the agent's image
//! built with buildah from deploy/image/Containerfile and run by podman (runc,
//! cgroupfs manager) with exactly the grants of
//! deploy/kubernetes/daemonset.yaml, read from that file; pods made by podman
//! under kubelet's cgroupfs layout (`<kubelet cgroup root>/kubepods/<qos>/pod<uid>`,
//! with podman's own levels below) on the runtime's own bridge network
//! (netavark); each node a network namespace of its own (its "host network")
//! with its own podman storage, `/run/palisade` and pin directory, nodes
//! joined by a fabric whose address also serves the fake API server, which
//! serves Pod objects with the UIDs and the addresses the runtime gave.
//!
//! What is the test's, not the runtime's: the fabric between the nodes and
//! its routes (a CNI's job), the masquerade exemption between pod networks
//! (ip-masq-agent's rule shape: `-d <pod CIDR> -j RETURN` ahead of netavark's
//! MASQUERADE), the API server, and the agent's kubeconfig (in-cluster
//! service-account credentials need a real API server).
//!
//! Safety: cgroups only under `palisade-test-<tag>` (in every hierarchy of
//! the hybrid layout podman writes to), addresses only inside the namespaces
//! made here (no route out), every container, pod, network, storage
//! directory, pin and cgroup removed on drop, also when a test fails.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    kubeapi::{self, FakeApiServer, Kind},
    world::{self, PodSpec, ip},
};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The CA bundle the image carries (see deploy/image/Containerfile).
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The static agent (`cargo xtask test` passes PALISADE_STATIC_AGENT; by
/// default the musl build next to the release binaries).
pub fn static_agent() -> PathBuf {
    std::env::var_os("PALISADE_STATIC_AGENT").map_or_else(
        || crate::bin_dir().join("../x86_64-unknown-linux-musl/release/palisade"),
        PathBuf::from,
    )
}

/// Why real-node tests cannot run here, if they cannot.
pub fn can_run() -> Result<(), String> {
    crate::can_run_kernel_tests()?;
    for tool in ["podman", "buildah", "runc", "nsenter", "iptables"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!(
                "`{tool}` is missing: run `cargo xtask setup` (it installs podman, buildah, runc)"
            ));
        }
    }
    if !static_agent().exists() {
        return Err(format!(
            "the static agent {} is missing: `cargo xtask test` builds it (or `cargo build --release -p palisade --target x86_64-unknown-linux-musl`)",
            static_agent().display()
        ));
    }
    Ok(())
}

/// Runs a command; its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One node: a network namespace (its host network), its podman with its own
/// storage, its kubelet cgroup root and its `/run/palisade`.
pub struct Node {
    pub name: String,
    pub index: u8,
    pub netns: String,
    /// Its address on the fabric (the Node object's InternalIP).
    pub address_v4: Ipv4Addr,
    pub address_v6: Ipv6Addr,
    /// kubelet's `--cgroup-root` relative to each hierarchy's root.
    pub kubelet_root: String,
    dir: PathBuf,
    subnet: u8,
}

impl Node {
    /// podman for this node: its storage, its network config, runc with
    /// the cgroupfs manager, entered into the node's network namespace (the
    /// runtime's bridge and the pods' veths are made there).
    pub fn podman(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .args(["--", "podman", "--root"])
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .arg("--network-config-dir")
            .arg(self.dir.join("networks"))
            .arg("--tmpdir")
            .arg(self.dir.join("libpod"))
            .args([
                "--cgroup-manager",
                "cgroupfs",
                "--runtime",
                "runc",
                "--events-backend",
                "file",
            ])
            .env("CONTAINERS_CONF", self.dir.join("../containers.conf"));
        cmd
    }

    /// `podman ARGS` on this node; its stdout.
    pub fn podman_run(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self.podman().args(args))
    }

    fn buildah(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"));
        cmd
    }

    /// The pods' network: 10.(80+index).S.0/24 and fd80:index:0:S::/64.
    pub fn pod_subnets(&self) -> (String, String) {
        (
            format!("10.{}.{}.0/24", 80 + self.index, self.subnet),
            format!("fd80:{:x}:0:{:x}::/64", self.index, self.subnet),
        )
    }

    /// kubelet's `kubepods` on the cgroup2 mount.
    pub fn kubepods(&self) -> anyhow::Result<PathBuf> {
        Ok(world::cgroup2_mount()?
            .join(&self.kubelet_root)
            .join("kubepods"))
    }

    /// The node's `/run/palisade` (the DaemonSet's hostPath).
    pub fn run_palisade(&self) -> PathBuf {
        self.dir.join("run-palisade")
    }

    /// `palisade status --json` of this node's agent.
    pub fn status(&self) -> anyhow::Result<Value> {
        crate::agent::status_at(&self.run_palisade().join("palisade.sock"))
    }

    /// GET `path` of the agent's HTTP endpoint on the node's address, as
    /// kubelet's probes do: (status code, body).
    pub fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let addr = (IpAddr::V4(self.address_v4), 9964).into();
        let (status, body) = kubeapi::in_netns(&self.netns, || crate::http_get(addr, path))??;
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status line")?;
        Ok((code, body))
    }
}

/// A pod made by the runtime.
#[derive(Clone, Debug)]
pub struct RealPod {
    pub namespace: String,
    pub name: String,
    /// The `app` label and service account.
    pub app: String,
    pub uid: String,
    pub node: usize,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The pod's network namespace (under /run/netns), made by podman.
    pub netns: String,
    /// The workload container's cgroup (cgroup2), made by runc.
    pub cgroup: PathBuf,
    /// podman's pod name.
    pub pod_name: String,
    /// The workload container's pid on the host (for its /tmp).
    pub pid: u32,
    pub spec: PodSpec,
}

impl RealPod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.ipv6.into()
        } else {
            self.ipv4.into()
        }
    }

    /// Connections accepted and datagrams received by the pod's listener.
    pub fn arrivals(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/root/tmp/arrivals", self.pid))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// An agent running in its container on a node.
pub struct AgentContainer {
    pub node: usize,
    pub name: String,
    pub image: String,
    pub pod_uid: String,
}

/// Nodes, their pods, their agents and the API server.
pub struct Cluster {
    pub tag: String,
    pub api: FakeApiServer,
    pub nodes: Vec<Node>,
    pub pods: Vec<RealPod>,
    pub agents: Vec<AgentContainer>,
    fabric: String,
    subnet: u8,
    rootfs: PathBuf,
    dir: tempfile::TempDir,
    template: Value,
    next_pod: usize,
}

/// The pod cgroup levels kubelet's cgroupfs driver makes, by QoS class.
fn qos_dir(index: usize) -> &'static str {
    match index % 3 {
        0 => "besteffort/",
        1 => "burstable/",
        _ => "",
    }
}

impl Cluster {
    /// A fabric with `count` nodes (`node-a`, `node-b`, …), each with its
    /// podman bridge network, and the API server on the fabric.
    pub fn new(count: u8) -> anyhow::Result<Cluster> {
        world::reap_stale_worlds();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("pal{}x{n}rn", std::process::id());
        let subnet = (std::process::id() as u8)
            .wrapping_mul(13)
            .wrapping_add(n as u8)
            % 200
            + 20;
        let fabric = format!("{tag}-fab");
        ip(&["netns", "add", &fabric])?;
        let dir = tempfile::Builder::new()
            .prefix("palisade-realnode-")
            .tempdir()?;
        let rootfs = dir.path().join("rootfs");
        let mut cluster = Cluster {
            api: FakeApiServer::start()?, // replaced below, once the fabric exists
            tag: tag.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            agents: Vec::new(),
            fabric: fabric.clone(),
            subnet,
            rootfs,
            dir,
            template: kubeapi::pod_template()?,
            next_pod: 0,
        };
        // From here on, `cluster` cleans up what exists when it drops.
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
        let api_ip = Ipv4Addr::new(10, 76, subnet, 1);
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            &format!("{api_ip}/24"),
            "dev",
            "br0",
        ])?;
        cluster.api = FakeApiServer::start_in(&fabric, api_ip.into())?;
        std::fs::write(
            cluster.dir.path().join("containers.conf"),
            // Limits no higher than this process's (raising them needs
            // CAP_SYS_RESOURCE, which a test runner may not have); logs as
            // kubelet reads them (the CRI file format).
            "[containers]\ndefault_ulimits = [\"nofile=4096:4096\", \"nproc=4096:4096\"]\nlog_driver = \"k8s-file\"\n[network]\nnetwork_backend = \"netavark\"\n",
        )?;
        for index in 0..count {
            cluster.add_node(index)?;
        }
        for (i, a) in cluster.nodes.iter().enumerate() {
            for (j, b) in cluster.nodes.iter().enumerate() {
                if i == j {
                    continue;
                }
                let (v4, v6) = b.pod_subnets();
                ip(&[
                    "-n",
                    &a.netns,
                    "route",
                    "add",
                    &v4,
                    "via",
                    &b.address_v4.to_string(),
                ])?;
                ip(&[
                    "-n",
                    &a.netns,
                    "-6",
                    "route",
                    "add",
                    &v6,
                    "via",
                    &b.address_v6.to_string(),
                ])?;
            }
        }
        cluster.make_rootfs()?;
        Ok(cluster)
    }

    fn add_node(&mut self, index: u8) -> anyhow::Result<()> {
        let letter = char::from(b'a' + index);
        let node = Node {
            name: format!("node-{letter}"),
            index,
            netns: format!("{}-n{letter}", self.tag),
            address_v4: Ipv4Addr::new(10, 76, self.subnet, 10 + index),
            address_v6: Ipv6Addr::new(
                0xfd76,
                0,
                0,
                u16::from(self.subnet),
                0,
                0,
                0,
                10 + u16::from(index),
            ),
            kubelet_root: format!("palisade-test-{}/node-{letter}", self.tag),
            dir: self.dir.path().join(format!("node-{letter}")),
            subnet: self.subnet,
        };
        for d in [
            "storage",
            "run",
            "networks",
            "libpod",
            "run-palisade",
            "etc-palisade",
        ] {
            std::fs::create_dir_all(node.dir.join(d))?;
        }
        let ns = node.netns.clone();
        ip(&["netns", "add", &ns])?;
        self.nodes.push(node);
        let node = self.nodes.last().context("node just added")?;
        let port = format!("f{}{letter}", self.subnet);
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &self.fabric,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.address_v4),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/64", node.address_v6),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ]))?;
        // Pod-to-pod traffic keeps its addresses between nodes (what
        // ip-masq-agent's non-masquerade CIDRs do), ahead of netavark's rule.
        for (tool, cidr) in [("iptables", "10.80.0.0/12"), ("ip6tables", "fd80::/16")] {
            run(Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                tool,
                "-t",
                "nat",
                "-I",
                "POSTROUTING",
                "1",
                "-d",
                cidr,
                "-j",
                "RETURN",
            ]))?;
        }
        let (v4, v6) = node.pod_subnets();
        node.podman_run(&[
            "network",
            "create",
            "--disable-dns",
            "--subnet",
            &v4,
            "--ipv6",
            "--subnet",
            &v6,
            "palisade",
        ])?;
        Ok(())
    }

    /// The workloads' root filesystem: busybox for a shell and
    /// palisade-testbed with the libraries it links.
    fn make_rootfs(&self) -> anyhow::Result<()> {
        let bin = self.rootfs.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(self.rootfs.join("usr/bin"))?;
        std::fs::copy("/bin/busybox", bin.join("busybox")).context("busybox-static is missing")?;
        for tool in ["sh", "cat", "sleep", "ls"] {
            std::os::unix::fs::symlink("busybox", bin.join(tool))?;
        }
        let testbed = crate::bin_dir().join("palisade-testbed");
        std::fs::copy(&testbed, self.rootfs.join("usr/bin/palisade-testbed"))?;
        let ldd = run(Command::new("ldd").arg(&testbed))?;
        for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
            let to = self.rootfs.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().context("library path")?)?;
            std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
        }
        Ok(())
    }

    /// Builds the agent's image as `cargo xtask image` does (buildah,
    /// deploy/image/Containerfile, the static agent) into `node`'s storage.
    pub fn build_image(&self, node: usize, tag: &str) -> anyhow::Result<()> {
        let context = self.dir.path().join("image");
        std::fs::create_dir_all(&context)?;
        std::fs::copy(static_agent(), context.join("palisade"))?;
        std::fs::copy(CA_BUNDLE, context.join("ca-certificates.crt"))
            .with_context(|| format!("{CA_BUNDLE} (Debian's ca-certificates)"))?;
        let containerfile =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image/Containerfile");
        run(self.nodes[node]
            .buildah()
            .args(["bud", "--quiet", "-f"])
            .arg(containerfile)
            .args(["-t", tag])
            .arg(&context))?;
        Ok(())
    }

    /// Serves the scenario's namespaces and the nodes as the API server holds them.
    pub fn publish_basics(&self) -> anyhow::Result<()> {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("kubernetes/fixtures");
        self.api
            .apply_list_file(Kind::Namespaces, &fixtures.join("namespaces.json"))?;
        self.api.apply(
            Kind::Namespaces,
            json!({"metadata": {"name": "palisade-system", "labels": {"kubernetes.io/metadata.name": "palisade-system"}}}),
        );
        for node in &self.nodes {
            self.api.apply(
                Kind::Nodes,
                json!({
                    "metadata": {"name": node.name, "uid": format!("{}-uid", node.name)},
                    "status": {"addresses": [
                        {"type": "InternalIP", "address": node.address_v4.to_string()},
                        {"type": "InternalIP", "address": node.address_v6.to_string()},
                        {"type": "Hostname", "address": node.name},
                    ]}
                }),
            );
        }
        Ok(())
    }

    fn next_uid(&mut self) -> String {
        self.next_pod += 1;
        format!(
            "{:08x}-{:04x}-4{:03x}-8000-{:012x}",
            std::process::id(),
            self.subnet,
            self.next_pod,
            self.next_pod * 7919
        )
    }

    /// A pod made by the runtime on `node`: podman pod (its sandbox, with
    /// the runtime's network; address `at` if given, as an IPAM recycling
    /// one) under kubelet's cgroup for the pod's QoS class, and its workload
    /// container running `palisade-testbed serve`. Not in the API server
    /// yet (see [`Cluster::publish_pod`]).
    pub fn run_pod(
        &mut self,
        node: usize,
        spec: PodSpec,
        app: &str,
        at: Option<(Ipv4Addr, Ipv6Addr)>,
    ) -> anyhow::Result<RealPod> {
        let uid = self.next_uid();
        let pod_name = format!("{}-{}", spec.namespace, spec.name);
        let n = &self.nodes[node];
        let parent = format!(
            "/{}/kubepods/{}pod{uid}",
            n.kubelet_root,
            qos_dir(self.next_pod)
        );
        let mut create = vec![
            "pod",
            "create",
            "--name",
            &pod_name,
            "--cgroup-parent",
            &parent,
            "--network",
            "palisade",
        ];
        let (v4, v6);
        if let Some((a4, a6)) = at {
            (v4, v6) = (a4.to_string(), a6.to_string());
            create.extend(["--ip", &v4, "--ip6", &v6]);
        }
        n.podman_run(&create)?;
        let join = |p: &[u16]| {
            p.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let (tcp, udp) = (join(&spec.tcp), join(&spec.udp));
        let ctr = format!("{pod_name}-main");
        let mut args = vec![
            "run",
            "-d",
            "--pod",
            &pod_name,
            "--name",
            &ctr,
            "--read-only",
            "--rootfs",
        ];
        let rootfs = self.rootfs.display().to_string();
        args.push(&rootfs);
        args.extend([
            "/usr/bin/palisade-testbed",
            "serve",
            "--count",
            "/tmp/arrivals",
        ]);
        if !tcp.is_empty() {
            args.extend(["--tcp", &tcp]);
        }
        if !udp.is_empty() {
            args.extend(["--udp", &udp]);
        }
        n.podman_run(&args)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !n.podman_run(&["logs", &ctr])?.contains("ready") {
            anyhow::ensure!(Instant::now() < deadline, "{ctr} did not print ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        let inspect: Value = serde_json::from_str(&n.podman_run(&["inspect", &ctr])?)?;
        let c = &inspect[0];
        let pid = c["State"]["Pid"].as_u64().context("no pid")? as u32;
        let netns = c["NetworkSettings"]["SandboxKey"]
            .as_str()
            .and_then(|p| p.strip_prefix("/run/netns/"))
            .context("no netns under /run/netns")?
            .to_owned();
        let net = &c["NetworkSettings"]["Networks"]["palisade"];
        let ipv4: Ipv4Addr = net["IPAddress"].as_str().context("no IPv4")?.parse()?;
        let ipv6: Ipv6Addr = net["GlobalIPv6Address"]
            .as_str()
            .context("no IPv6")?
            .parse()?;
        let cgroup_line = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let rel = cgroup_line
            .lines()
            .find_map(|l| l.strip_prefix("0::/"))
            .context("no cgroup2 line")?;
        let cgroup = world::cgroup2_mount()?.join(rel);
        anyhow::ensure!(
            cgroup.starts_with(n.kubepods()?),
            "{} is not under kubelet's kubepods",
            cgroup.display()
        );
        let pod = RealPod {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            app: app.to_owned(),
            uid,
            node,
            ipv4,
            ipv6,
            netns,
            cgroup,
            pod_name,
            pid,
            spec,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// The pod's object as the API server holds it once kubelet reported
    /// it Running with the runtime's addresses.
    pub fn pod_object(&self, pod: &RealPod) -> Value {
        let mut obj = kubeapi::pod_object(
            &self.template,
            &pod.uid,
            (&pod.namespace, &pod.name, &pod.app),
            &[pod.ipv4.to_string(), pod.ipv6.to_string()],
            &self.nodes[pod.node].name,
        );
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        obj["status"]["hostIP"] = json!(self.nodes[pod.node].address_v4.to_string());
        obj["spec"]["containers"][0]["ports"] = json!(
            pod.spec
                .tcp
                .iter()
                .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
                .chain(
                    pod.spec
                        .udp
                        .iter()
                        .map(|p| json!({"containerPort": p, "protocol": "UDP"}))
                )
                .collect::<Vec<_>>()
        );
        obj
    }

    /// Publishes the pod to the API server; returns the resourceVersion.
    pub fn publish_pod(&self, pod: &RealPod) -> u64 {
        self.api.apply(Kind::Pods, self.pod_object(pod))
    }

    /// Removes the pod's sandbox and containers (the runtime frees its address).
    pub fn remove_pod(&mut self, key: &str) -> anyhow::Result<RealPod> {
        let i = self
            .pods
            .iter()
            .position(|p| p.key() == key)
            .with_context(|| format!("no pod {key}"))?;
        let pod = self.pods.remove(i);
        self.nodes[pod.node].podman_run(&["pod", "rm", "-f", "-t", "0", &pod.pod_name])?;
        Ok(pod)
    }

    pub fn pod(&self, key: &str) -> &RealPod {
        self.pods
            .iter()
            .find(|p| p.key() == key)
            .unwrap_or_else(|| panic!("no pod {key}"))
    }

    /// The agent's config on `node`: deploy/kubernetes/configmap.yaml's
    /// agent.yaml, with this node's pin directory and kubelet cgroup root
    /// (two nodes share this machine's bpffs and cgroup tree).
    fn write_agent_config(&self, node: usize) -> anyhow::Result<()> {
        let n = &self.nodes[node];
        let cm: Value = palisade::yaml::from_str(&std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/configmap.yaml"),
        )?)
        .map_err(|e| anyhow::anyhow!("configmap.yaml: {}", e.message))?;
        let agent_yaml = cm["data"]["agent.yaml"]
            .as_str()
            .context("no agent.yaml in the ConfigMap")?;
        anyhow::ensure!(agent_yaml.contains("bpfPinDir: /sys/fs/bpf/palisade\n"));
        let config = agent_yaml.replace(
            "bpfPinDir: /sys/fs/bpf/palisade\n",
            &format!(
                "bpfPinDir: /sys/fs/bpf/palisade-test-{}-{}\ncgroupRoot: /host/sys/fs/cgroup/unified/{}/kubepods\n",
                self.tag, n.name, n.kubelet_root
            ),
        );
        let etc = n.dir.join("etc-palisade");
        std::fs::write(etc.join("agent.yaml"), config)?;
        std::fs::write(
            etc.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
                self.api.addr
            ),
        )?;
        Ok(())
    }

    /// Starts the agent's container on `node` from `image`, with what the
    /// DaemonSet grants (see [`daemonset_grants`]), as a hostNetwork pod of
    /// its own (a Pod object in the API server, kubelet's Burstable pod
    /// cgroup). Returns once the container runs.
    pub fn start_agent(&mut self, node: usize, image: &str) -> anyhow::Result<()> {
        self.write_agent_config(node)?;
        let uid = self.next_uid();
        let n = &self.nodes[node];
        let grants = daemonset_grants()?;
        let name = format!("palisade-agent-{}-{}", n.name, self.next_pod);
        // The agent's Pod first, as kubelet runs a pod the API server has.
        let mut obj = kubeapi::pod_object(
            &self.template,
            &uid,
            ("palisade-system", &name, "palisade-agent"),
            &[n.address_v4.to_string()],
            &n.name,
        );
        obj["spec"]["hostNetwork"] = json!(true);
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        self.api.apply(Kind::Pods, obj);
        let host_paths: BTreeMap<&str, PathBuf> = BTreeMap::from([
            ("/etc/palisade", n.dir.join("etc-palisade")),
            ("/run/palisade", n.run_palisade()),
        ]);
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--cgroup-parent".into(),
            format!("/{}/kubepods/burstable/pod{uid}", n.kubelet_root),
            "--env".into(),
            format!("NODE_NAME={}", n.name),
        ];
        args.extend(grants.podman_args(&host_paths)?);
        args.push(image.into());
        args.extend(grants.args.iter().cloned());
        // In a cluster the agent finds the API server through its service
        // account; here a kubeconfig names the fake one.
        args.extend(["--kubeconfig".into(), "/etc/palisade/kubeconfig".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        n.podman_run(&refs)?;
        self.agents.push(AgentContainer {
            node,
            name,
            image: image.into(),
            pod_uid: uid,
        });
        Ok(())
    }

    /// Stops the agent's container on `node` as kubelet does in a rollout
    /// (SIGTERM, grace period), removes it and its Pod object.
    pub fn stop_agent(&mut self, node: usize) -> anyhow::Result<String> {
        let i = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .context("no agent on that node")?;
        let agent = self.agents.remove(i);
        let n = &self.nodes[node];
        let log = self.agent_log_of(node, &agent.name)?;
        n.podman_run(&["stop", "-t", "30", &agent.name])?;
        let log_after = self.agent_log_of(node, &agent.name).unwrap_or(log);
        n.podman_run(&["rm", "-f", &agent.name])?;
        self.api.delete(Kind::Pods, "palisade-system", &agent.name);
        Ok(log_after)
    }

    /// The agent container's log file (CRI format: `<time> stdout|stderr F <line>`).
    fn agent_log_of(&self, node: usize, name: &str) -> anyhow::Result<String> {
        let path = self.nodes[node].podman_run(&[
            "inspect",
            "--format",
            "{{.HostConfig.LogConfig.Path}}",
            name,
        ])?;
        Ok(std::fs::read_to_string(path.trim()).unwrap_or_default())
    }

    /// The current agent's log on `node`.
    pub fn agent_log(&self, node: usize) -> anyhow::Result<String> {
        let agent = self
            .agents
            .iter()
            .find(|a| a.node == node)
            .context("no agent on that node")?;
        self.agent_log_of(node, &agent.name)
    }

    /// Waits until `node`'s agent is ready and enforces each of its pods with
    /// its addresses (status over the control socket, readiness over HTTP as
    /// kubelet probes it).
    pub fn wait_agent_ready(&self, node: usize, timeout: Duration) -> anyhow::Result<Value> {
        let n = &self.nodes[node];
        let local: Vec<&RealPod> = self.pods.iter().filter(|p| p.node == node).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let status = n.status();
            if let Ok(s) = &status {
                let enforced = |p: &&RealPod| {
                    s["workload_list"].as_array().is_some_and(|l| {
                        l.iter().any(|w| {
                            w["addresses"]
                                .as_array()
                                .is_some_and(|a| a.iter().any(|x| x == &json!(p.ipv4.to_string())))
                        })
                    })
                };
                if s["ready"] == json!(true)
                    && local.iter().all(enforced)
                    && n.http_get("/readyz").is_ok_and(|(code, _)| code == 200)
                {
                    return status;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {} is not ready with every pod within {timeout:?}; status: {}\nlog:\n{}",
                    n.name,
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                    self.agent_log(node).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Audit events in `log` (an agent container's log): its stdout lines.
    /// The CRI log format splits a line the runtime read in pieces into
    /// partial (`P`) records ended by a full (`F`) one; they are joined as a
    /// log shipper joins them.
    pub fn events_in(log: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut pending = String::new();
        for l in log.lines() {
            let mut parts = l.splitn(4, ' ');
            let (Some(_), Some(stream), Some(tag), text) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next().unwrap_or(""),
            ) else {
                continue;
            };
            if stream != "stdout" {
                continue;
            }
            pending.push_str(text);
            if tag == "F" {
                if let Ok(v) = serde_json::from_str(&pending) {
                    out.push(v);
                }
                pending.clear();
            }
        }
        out
    }

    /// A probe from `from` as a process of its workload container (runc
    /// exec): `ok`, `eperm`, `timeout`, `refused`, `error …`.
    pub fn exec_probe(
        &self,
        from: &RealPod,
        proto: &str,
        to: IpAddr,
        port: u16,
        timeout_ms: u64,
    ) -> String {
        let n = &self.nodes[from.node];
        let (to, port, ms) = (to.to_string(), port.to_string(), timeout_ms.to_string());
        let out = n
            .podman()
            .args([
                "exec",
                &format!("{}-main", from.pod_name),
                "/usr/bin/palisade-testbed",
                "probe",
                proto,
                &to,
                &port,
                "--timeout-ms",
                &ms,
            ])
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            Err(e) => format!("error {e}"),
        }
    }

    /// The same probe started directly in the container's cgroup and network
    /// namespace (a few ms instead of a runc exec's ~200): for continuous probes.
    pub fn fast_probe(
        from: &RealPod,
        proto: &str,
        to: IpAddr,
        port: u16,
        timeout_ms: u64,
    ) -> String {
        let timeout = Duration::from_millis(timeout_ms);
        world::probe_in(&from.cgroup, &from.netns, proto, to, port, timeout)
            .unwrap_or_else(|e| format!("error {e}"))
    }
}

/// Now, as the API server writes a creationTimestamp (RFC 3339, seconds, UTC).
fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// One volumeMount of the DaemonSet with its volume.
pub struct Mount {
    pub volume: String,
    /// The hostPath; `None` for a configMap.
    pub host_path: Option<String>,
    pub mount_path: String,
    pub read_only: bool,
    /// `HostToContainer` and the like.
    pub propagation: Option<String>,
}

/// What deploy/kubernetes/daemonset.yaml grants the agent's container,
/// read from the file.
pub struct Grants {
    pub host_network: bool,
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    pub read_only_root: bool,
    pub no_new_privileges: bool,
    pub seccomp_unconfined: bool,
    pub apparmor_unconfined: bool,
    pub memory_limit: Option<String>,
    pub mounts: Vec<Mount>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Reads the DaemonSet's agent container.
pub fn daemonset_grants() -> anyhow::Result<Grants> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml");
    let ds: Value = palisade::yaml::from_str(&std::fs::read_to_string(&path)?)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message))?;
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    anyhow::ensure!(
        sc["privileged"] != json!(true),
        "the DaemonSet runs the agent privileged"
    );
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let volumes: BTreeMap<String, Value> = pod["volumes"]
        .as_array()
        .context("no volumes")?
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v.clone())))
        .collect();
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().context("no volumeMounts")? {
        let name = m["name"].as_str().context("volumeMount without name")?;
        let volume = volumes
            .get(name)
            .with_context(|| format!("no volume {name}"))?;
        mounts.push(Mount {
            volume: name.to_owned(),
            host_path: volume["hostPath"]["path"].as_str().map(str::to_owned),
            mount_path: m["mountPath"].as_str().context("no mountPath")?.to_owned(),
            read_only: m["readOnly"] == json!(true),
            propagation: m["mountPropagation"].as_str().map(str::to_owned),
        });
    }
    let env = c["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_owned(),
                        e["value"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Grants {
        host_network: pod["hostNetwork"] == json!(true),
        caps_add: strings(&sc["capabilities"]["add"]),
        caps_drop: strings(&sc["capabilities"]["drop"]),
        read_only_root: sc["readOnlyRootFilesystem"] == json!(true),
        no_new_privileges: sc["allowPrivilegeEscalation"] == json!(false),
        seccomp_unconfined: sc["seccompProfile"]["type"] == json!("Unconfined"),
        apparmor_unconfined: sc["appArmorProfile"]["type"] == json!("Unconfined"),
        memory_limit: c["resources"]["limits"]["memory"]
            .as_str()
            .map(str::to_owned),
        mounts,
        args: strings(&c["args"]),
        env,
    })
}

impl Grants {
    /// The same grants as podman options. `host_paths` maps a mountPath to
    /// this node's directory where the node's path cannot be shared between
    /// two nodes on one machine (its config, its `/run/palisade`).
    pub fn podman_args(&self, host_paths: &BTreeMap<&str, PathBuf>) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        if self.host_network {
            out.extend(["--network".into(), "host".into()]);
        }
        for cap in &self.caps_drop {
            out.extend(["--cap-drop".into(), cap.to_lowercase()]);
        }
        for cap in &self.caps_add {
            out.extend(["--cap-add".into(), cap.to_lowercase()]);
        }
        if self.read_only_root {
            out.push("--read-only".into());
        }
        if self.no_new_privileges {
            out.extend(["--security-opt".into(), "no-new-privileges".into()]);
        }
        if self.seccomp_unconfined {
            out.extend(["--security-opt".into(), "seccomp=unconfined".into()]);
        }
        // podman refuses an AppArmor option where the kernel has no AppArmor.
        if self.apparmor_unconfined && Path::new("/sys/kernel/security/apparmor").exists() {
            out.extend(["--security-opt".into(), "apparmor=unconfined".into()]);
        }
        if let Some(limit) = &self.memory_limit {
            let mib = limit.strip_suffix("Mi").context("memory limit not in Mi")?;
            out.extend(["--memory".into(), format!("{mib}m")]);
        }
        for (k, v) in &self.env {
            out.extend(["--env".into(), format!("{k}={v}")]);
        }
        for m in &self.mounts {
            let source = match host_paths.get(m.mount_path.as_str()) {
                Some(dir) => dir.display().to_string(),
                None => m.host_path.clone().with_context(|| {
                    format!("volume {} is neither a hostPath nor provided", m.volume)
                })?,
            };
            let mut opts = vec![if m.read_only { "ro" } else { "rw" }];
            if m.propagation.as_deref() == Some("HostToContainer") {
                opts.push("rslave");
            }
            out.extend([
                "--volume".into(),
                format!("{source}:{}:{}", m.mount_path, opts.join(",")),
            ]);
        }
        Ok(out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.api.shutdown();
        for node in &self.nodes {
            let _ = node.podman_run(&["rm", "-a", "-f", "-t", "0"]);
            let _ = node.podman_run(&["pod", "rm", "-a", "-f", "-t", "0"]);
            let _ = node.podman_run(&["network", "rm", "-f", "palisade"]);
            let _ = std::fs::remove_dir_all(format!(
                "/sys/fs/bpf/palisade-test-{}-{}",
                self.tag, node.name
            ));
        }
        // Storage mounts (overlay layers, the runroot's shm) before the files.
        let prefix = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            if let Ok(c) = std::ffi::CString::new(m) {
                // SAFETY: a path string; detaching a mount the test made.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        for node in &self.nodes {
            let _ = ip(&["netns", "del", &node.netns]);
        }
        let _ = ip(&["netns", "del", &self.fabric]);
        // Every hierarchy of the hybrid layout podman wrote to.
        let base = format!("palisade-test-{}", self.tag);
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                world::remove_cgroup_tree(&e.path().join(&base));
            }
        }
        if let Ok(mount) = world::cgroup2_mount() {
            world::remove_cgroup_tree(&mount.join(&base));
        }
        // The storage, once the detached mounts let go of it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir_all(self.dir.path()).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
