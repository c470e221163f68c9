//! Figure 7: the agent as an operator sees it in a large cluster — the
//! agent binary with its own watches, against an API server holding N pods
//! on 200 other nodes (2,500 label sets over 100 namespaces, a ClusterIP
//! Service and EndpointSlice per label set, 500 NetworkPolicies) and the
//! seed scenario's six pods on this node. Per size, side by side in one
//! run: start → ready, resident memory (after ready and peak), CPU at rest,
//! CPU while 16 remote pod events arrive per second, and how long a change
//! takes to flip a real verdict on this node (a local pod relabelled, a
//! NetworkPolicy added and deleted; probed with real connections).
use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{proc_cpu_ticks, proc_rss_mib, proc_status_mib, report::Summary, step};
use crate::{
    agent::Agent,
    kubeapi::{FakeApiServer, Kind, pod_object, pod_template},
    kubeproxy::service_objects,
    scenario,
    world::World,
};

const NAMESPACES: usize = 100;
const APPS: usize = 25;
const NODES: usize = 200;
const POLICIES: usize = 500;
const NODE: &str = "bench-node";
/// Remote pod events per second while CPU is counted.
const EVENT_RATE: u32 = 16;

pub fn figure(quick: bool) -> anyhow::Result<Value> {
    let sizes: &[usize] = if quick {
        &[200, 1_000]
    } else {
        &[2_000, 50_000]
    };
    let mut rows = Vec::new();
    for &pods in sizes {
        step(&format!(
            "the agent's own watches with {pods} pods in the cluster"
        ));
        rows.push(one_size(pods, quick)?);
    }
    let ratio = |key: &str| {
        let (a, b) = (&rows[0][key], &rows[rows.len() - 1][key]);
        b.as_f64().unwrap_or(0.0) / a.as_f64().unwrap_or(1.0).max(1e-9)
    };
    let growth = json!({
        "rssMiB": ratio("rssMiB"),
        "startToReadyMs": ratio("startToReadyMs"),
    });
    Ok(json!({ "sizes": rows, "largestOverSmallest": growth }))
}

fn remote_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32,
    ))
}

fn remote_pod(template: &Value, i: usize, relabel: usize) -> Value {
    let ns = format!("ns{}", i % NAMESPACES);
    let app = format!("app{}", (i / NAMESPACES + relabel) % APPS);
    pod_object(
        template,
        &format!("00000000-0000-4000-8000-{i:012}"),
        (&ns, &format!("pod-{i}"), &app),
        &[remote_ip(i).to_string()],
        &format!("node-{}", i % NODES),
    )
}

/// The cluster's objects, the world's six pods on this node, the agent
/// started; then each measurement.
fn one_size(pods: usize, quick: bool) -> anyhow::Result<Value> {
    let api = FakeApiServer::start()?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("kubernetes/fixtures");
    api.apply_list_file(Kind::Namespaces, &fixtures.join("namespaces.json"))?;
    api.apply_list_file(
        Kind::NetworkPolicies,
        &fixtures.join("networkpolicies.json"),
    )?;
    for n in 0..NAMESPACES {
        api.apply(
            Kind::Namespaces,
            json!({"metadata": {"name": format!("ns{n}"), "labels": {"kubernetes.io/metadata.name": format!("ns{n}")}}}),
        );
    }
    let template = pod_template()?;
    let mut by_app: Vec<Vec<IpAddr>> = vec![Vec::new(); NAMESPACES * APPS];
    for i in 0..pods {
        api.apply(Kind::Pods, remote_pod(&template, i, 0));
        by_app[(i % NAMESPACES) * APPS + (i / NAMESPACES) % APPS].push(remote_ip(i));
    }
    for (k, ips) in by_app.iter().enumerate() {
        let (ns, app) = (format!("ns{}", k / APPS), format!("app{}", k % APPS));
        let vip = IpAddr::V4(Ipv4Addr::from(
            u32::from(Ipv4Addr::new(172, 20, 0, 0)) + k as u32,
        ));
        let (svc, slice) = service_objects(&ns, &app, &[vip], &[("http", "TCP", 80, 8080)], ips);
        api.apply(Kind::Services, svc);
        api.apply(Kind::EndpointSlices, slice);
    }
    for p in 0..POLICIES {
        api.apply(
            Kind::NetworkPolicies,
            json!({
                "metadata": {"name": format!("np{p}"), "namespace": format!("ns{}", p % NAMESPACES)},
                "spec": {
                    "podSelector": {"matchLabels": {"app": format!("app{}", p % APPS)}},
                    "ingress": [{
                        "from": [{"podSelector": {"matchLabels": {"app": format!("app{}", (p + 1) % APPS)}}}],
                        "ports": [{"port": 8080}],
                    }],
                },
            }),
        );
    }

    let mut world = World::new()?;
    let mut local = Vec::new();
    for (i, mut spec) in scenario::pods().into_iter().enumerate() {
        let uid = format!("{i:08x}-5a1d-4e2f-9b3c-{:012x}", 0xbe7c + i);
        spec.cgroup = Some(format!(
            "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{:064x}.scope",
            uid.replace('-', "_"),
            i + 0xbe7c
        ));
        let pod = world.add_pod(spec.clone())?;
        let ips = [pod.ipv4.to_string(), pod.ipv6.to_string()];
        let obj = pod_object(
            &template,
            &uid,
            (&spec.namespace, &spec.name, &spec.name),
            &ips,
            NODE,
        );
        api.apply(Kind::Pods, obj.clone());
        local.push(obj);
    }
    let dir = tempfile::tempdir()?;
    let config = format!(
        "cgroupRoot: {root}/kubepods.slice\nbpfPinDir: /sys/fs/bpf/palisade-test-{tag}\ncontrolSocket: {dir}/palisade.sock\n\
         audit:\n  output: {dir}/audit.jsonl\ntrustDomain: bench.example\n",
        root = world.cgroup_root.display(),
        tag = world.tag,
        dir = dir.path().display(),
    );
    let kubeconfig = api.kubeconfig(dir.path())?;
    let started = Instant::now();
    let mut agent = Agent::start_with_args(
        dir.path(),
        &config,
        &[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().context("path")?,
            "--node-name",
            NODE,
        ],
    )?;
    agent.wait_status("ready", Duration::from_secs(180), |s| s["ready"] == true)?;
    let ready = started.elapsed();
    agent.wait_enforcing(&world)?;
    let pid = agent.pid().context("agent pid")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = |window: Duration, during: &dyn Fn()| {
        let t0 = proc_cpu_ticks(pid);
        let start = Instant::now();
        during();
        let rest = window.saturating_sub(start.elapsed());
        std::thread::sleep(rest);
        (proc_cpu_ticks(pid) - t0) as f64 / hz / window.as_secs_f64() * 100.0
    };
    let (settle, window) = if quick {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_secs(11), Duration::from_secs(10))
    };
    std::thread::sleep(settle);
    let rss = proc_rss_mib(pid);
    let idle = cpu(window, &|| {});

    // Remote pods relabelled at EVENT_RATE per second.
    let events = |window: Duration, from: usize| {
        let every = Duration::from_secs(1) / EVENT_RATE;
        let start = Instant::now();
        let mut k = from;
        while start.elapsed() < window {
            api.apply(Kind::Pods, remote_pod(&template, k % pods, 1 + k / pods));
            k += 1;
            std::thread::sleep(every);
        }
    };
    let busy = cpu(window, &|| events(window, 0));

    // Verdict flips on this node, with real connections: logging →
    // payment-service:443 is denied by the seed policy.
    let (logging, payment) = (
        world.pod("production/logging"),
        world.pod("production/payment-service"),
    );
    let to: IpAddr = payment.ipv4.into();
    let flip = |want: &str| -> anyhow::Result<f64> {
        let start = Instant::now();
        while world.probe(logging, "tcp", to, 443, Duration::from_millis(30))? != want {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "no flip to {want}"
            );
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    anyhow::ensure!(
        flip("timeout")? < 1000.0,
        "logging → payment-service:443 denied at first"
    );
    let logging_obj = local
        .iter()
        .find(|o| o["metadata"]["name"] == "logging")
        .context("logging's object")?
        .clone();
    let rounds = if quick { 2 } else { 5 };
    // logging relabelled as order-service (allowed): the time to the flip;
    // then back (denied again).
    let relabel_round = || -> anyhow::Result<f64> {
        let mut as_order = logging_obj.clone();
        as_order["metadata"]["labels"]["app"] = json!("order-service");
        api.apply(Kind::Pods, as_order);
        let took = flip("ok")?;
        api.apply(Kind::Pods, logging_obj.clone());
        flip("timeout")?;
        Ok(took)
    };
    let (mut relabel, mut np_add, mut np_delete) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        relabel.push(relabel_round()?);
        api.apply(
            Kind::NetworkPolicies,
            json!({
                "metadata": {"name": "bench-allow-logging", "namespace": "production"},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "payment-service"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "logging"}}}], "ports": [{"port": 443}]}],
                },
            }),
        );
        np_add.push(flip("ok")?);
        api.delete(Kind::NetworkPolicies, "production", "bench-allow-logging");
        np_delete.push(flip("timeout")?);
    }
    // The same relabel while remote pod events arrive.
    let mut relabel_busy = Vec::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let feeder = scope.spawn(|| {
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                events(Duration::from_millis(500), pods + k);
                k += 8;
            }
        });
        let result = (|| {
            for _ in 0..rounds {
                relabel_busy.push(relabel_round()?);
            }
            Ok(())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = feeder.join();
        result
    })?;
    let peak = proc_status_mib(pid, "VmHWM:");
    agent.stop()?;
    Ok(json!({
        "pods": pods + scenario::pods().len(),
        "nodes": NODES + 1,
        "services": NAMESPACES * APPS,
        "networkPolicies": POLICIES + 1,
        "startToReadyMs": ready.as_secs_f64() * 1e3,
        "rssMiB": rss,
        "peakRssMiB": peak,
        "idleCpuPercent": idle,
        "eventsPerSecond": EVENT_RATE,
        "eventCpuPercent": busy,
        "relabelToVerdictMs": Summary::of(&relabel),
        "policyAddToVerdictMs": Summary::of(&np_add),
        "policyDeleteToVerdictMs": Summary::of(&np_delete),
        "relabelUnderEventsMs": Summary::of(&relabel_busy),
    }))
}
