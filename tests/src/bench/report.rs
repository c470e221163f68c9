//! The benchmark report: summaries, the targets of the benchmark issue with
//! whether each is met (and by how much), `report.json` and `report.md`.
use std::{fmt::Write as _, path::Path, process::Command};

use serde::Serialize;
use serde_json::{Value, json};

/// Median with min and max.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => v[n / 2],
            _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Summary {
            median,
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
            n,
        }
    }
}

fn output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Kernel, CPUs, CPU model, commit, time.
pub fn machine() -> Value {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let commit = output("git", &["rev-parse", "--short=12", "HEAD"]);
    let dirty = !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    json!({
        "kernel": output("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "cpuModel": cpu_model,
        "commit": if dirty { format!("{commit}+changes") } else { commit },
        "date": output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The issue's targets: (what, target text, measured, met).
pub fn targets(r: &Value) -> Value {
    let t = &r["throughput"];
    let tenk = |fig: &str, key: &str| num(&t[fig]["palisade-10k"][key]["median"]);
    let mut rows = Vec::new();
    let mut at_least = |what: &str, measured: f64, target: f64, unit: &str| {
        rows.push(json!({
            "what": what,
            "target": format!("≥ {target}{unit}"),
            "measured": measured,
            "met": measured >= target,
            "gap": if measured >= target { Value::Null } else { json!(format!("{:.1}% short", (1.0 - measured / target) * 100.0)) },
        }));
    };
    at_least(
        "palisade-10k / none, new connections",
        tenk("newConnections", "ratioToNone"),
        0.97,
        "",
    );
    at_least(
        "palisade-10k / none, request/response",
        tenk("requestResponse", "ratioToNone"),
        0.99,
        "",
    );
    at_least(
        "palisade-10k / iptables-10k, new connections",
        tenk("newConnections", "ratioToIptables"),
        3.0,
        "",
    );
    at_least(
        "palisade-10k / nftables-10k, new connections",
        tenk("newConnections", "ratioToNftables"),
        1.0,
        "",
    );
    at_least(
        "audit events delivered per second",
        num(&r["audit"]["deliveredPerSecond"]),
        100_000.0,
        "",
    );
    let mut at_most = |what: &str, measured: f64, target: f64, unit: &str| {
        rows.push(json!({
            "what": what,
            "target": format!("≤ {target}{unit}"),
            "measured": measured,
            "met": measured <= target,
            "gap": if measured <= target { Value::Null } else { json!(format!("{:.1}× the target", measured / target)) },
        }));
    };
    for p in r["programs"].as_array().into_iter().flatten() {
        if let Some(ratio) = p["ratioToNoop"].as_f64() {
            at_most(
                &format!(
                    "{} program {} / no-op of its type",
                    p["config"].as_str().unwrap_or_default(),
                    p["program"].as_str().unwrap_or_default()
                ),
                ratio,
                2.0,
                "",
            );
        }
    }
    at_most(
        "full apply, 10k rules (ms)",
        num(&r["apply"]["fullMs"]["median"]),
        200.0,
        " ms",
    );
    at_most(
        "one-rule change (ms)",
        num(&r["apply"]["oneRuleMs"]["median"]),
        10.0,
        " ms",
    );
    at_most(
        "apply → enforced (ms)",
        num(&r["apply"]["applyToEnforcedMs"]["median"]),
        50.0,
        " ms",
    );
    at_most(
        "agent RSS with the 10k policy (MiB)",
        num(&r["agent"]["tenK"]["rssMiB"]),
        64.0,
        " MiB",
    );
    at_most(
        "start → enforcing, 10k policy (ms)",
        num(&r["agent"]["startToEnforcingMs10k"]["median"]),
        500.0,
        " ms",
    );
    let pod_event = r["scale"]["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| row["pods"] == 50_000 && row["path"] == "changes")
        .map_or(f64::NAN, |row| num(&row["eventMs"]["median"]));
    at_most("one pod event, 50,000 pods (ms)", pod_event, 10.0, " ms");
    let largest = r["cluster"]["sizes"]
        .as_array()
        .and_then(|rows| rows.last())
        .filter(|row| row["pods"].as_u64().unwrap_or(0) >= 50_000);
    at_most(
        "agent RSS, its own watches at 50,000 pods (MiB)",
        largest.map_or(f64::NAN, |row| num(&row["rssMiB"])),
        128.0,
        " MiB",
    );
    let exact = r["audit"]["exact"].as_bool().unwrap_or(false);
    rows.push(json!({
        "what": "audit: emitted = delivered + lost",
        "target": "exactly",
        "measured": format!("{} = {} + {}", r["audit"]["emitted"], r["audit"]["delivered"], r["audit"]["lost"]),
        "met": exact,
        "gap": Value::Null,
    }));
    // A figure left out with `--only` has no number: say so instead of "no".
    let audit_measured = !r["audit"].is_null();
    for row in &mut rows {
        let missing = match &row["measured"] {
            Value::String(_) => !audit_measured,
            v => v.as_f64().is_none_or(f64::is_nan),
        };
        if missing {
            row["measured"] = Value::Null;
            row["met"] = Value::Null;
        }
    }
    Value::Array(rows)
}

fn s(v: &Value, digits: usize) -> String {
    if v.is_null() {
        return "–".into();
    }
    format!(
        "{:.digits$} ({:.digits$}–{:.digits$})",
        num(&v["median"]),
        num(&v["min"]),
        num(&v["max"])
    )
}

/// The Markdown report (also what the README's Performance section shows).
pub fn markdown(r: &Value) -> String {
    let m = &r["machine"];
    let o = &r["options"];
    let mut md = String::new();
    let _ = writeln!(md, "# Palisade benchmark report\n");
    let _ = writeln!(
        md,
        "Kernel {}, {} CPUs ({}), commit {}, {}. {} rounds, interleaved; {} ms per measurement, {} concurrent clients; {} rules over {} identities. Reproduce: `cargo xtask bench{}` (as root).\n",
        m["kernel"].as_str().unwrap_or_default(),
        m["cpus"],
        m["cpuModel"].as_str().unwrap_or_default(),
        m["commit"].as_str().unwrap_or_default(),
        m["date"].as_str().unwrap_or_default(),
        o["rounds"],
        o["durationMs"],
        o["clients"],
        o["rules"],
        o["identities"],
        if o["quick"].as_bool().unwrap_or(false) {
            " --quick"
        } else {
            ""
        },
    );
    let _ = writeln!(
        md,
        "Values are median (min–max) over the rounds; ratios are taken per round against that round's `none`.\n"
    );
    for (fig, title) in [
        (
            "newConnections",
            "1a. New TCP connections per second (connect, 8-byte request/response, close)",
        ),
        (
            "requestResponse",
            "1b. Request/response per second on established connections",
        ),
    ] {
        let _ = writeln!(md, "## {title}\n");
        let _ = writeln!(
            md,
            "| configuration | per second | ratio to none | ratio to iptables-10k | ratio to nftables-10k |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for cfg in super::CONFIGS {
            let e = &r["throughput"][fig][cfg];
            let _ = writeln!(
                md,
                "| {cfg} | {} | {} | {} | {} |",
                s(&e["perSecond"], 0),
                s(&e["ratioToNone"], 3),
                s(&e["ratioToIptables"], 2),
                s(&e["ratioToNftables"], 2)
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "## 2. Cost per program invocation (kernel run_time_ns / run_cnt)\n\n\
         Traffic while the statistics run: the new-connection load over IPv4 and \
         IPv6 (connect4/6, ingress, egress: every packet that leaves) and DNS-like \
         UDP request/response over both \
         families with `sendto()` on unconnected sockets, a fresh socket every \
         100 exchanges (sendmsg4/6). Each no-op is attached at the same cgroup \
         as the program it is compared with and sees the same invocations.\n"
    );
    let _ = writeln!(
        md,
        "| configuration | program | runs | ns per run | no-op of its type (ns) | ratio |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for p in r["programs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} {:.0} | {} |",
            p["config"].as_str().unwrap_or_default(),
            p["program"].as_str().unwrap_or_default(),
            p["runs"],
            num(&p["nsPerRun"]),
            p["baseline"].as_str().unwrap_or_default(),
            num(&p["baselineNsPerRun"]),
            p["ratioToNoop"]
                .as_f64()
                .map_or("not exercised".to_owned(), |x| format!("{x:.2}")),
        );
    }
    let a = &r["apply"];
    let _ = writeln!(md, "\n## 3. Policy apply\n");
    let _ = writeln!(md, "| what | ms |");
    let _ = writeln!(md, "|---|---|");
    let _ = writeln!(
        md,
        "| full compile + map sync ({} policy entries) | {} |",
        a["policyEntries"],
        s(&a["fullMs"], 1)
    );
    let _ = writeln!(md, "| … of which compile | {} |", s(&a["fullCompileMs"], 1));
    let _ = writeln!(md, "| … of which map sync | {} |", s(&a["fullSyncMs"], 1));
    let _ = writeln!(
        md,
        "| one-rule change (compile + map sync) | {} |",
        s(&a["oneRuleMs"], 2)
    );
    let _ = writeln!(
        md,
        "| `palisade policy apply` returning → probe sees the new verdict | {} |",
        s(&a["applyToEnforcedMs"], 1)
    );
    let au = &r["audit"];
    let _ = writeln!(md, "\n## 4. Audit\n");
    let _ = writeln!(
        md,
        "{} denied connections in {:.2} s ({:.0}/s): emitted {}, delivered to the JSON sink {}, lost {} ({}); {:.0} events/s delivered.\n",
        au["denied"],
        num(&au["floodSeconds"]),
        num(&au["deniedPerSecond"]),
        au["emitted"],
        au["delivered"],
        au["lost"],
        if au["exact"].as_bool().unwrap_or(false) {
            "emitted = delivered + lost"
        } else {
            "MISMATCH"
        },
        num(&au["deliveredPerSecond"]),
    );
    let ag = &r["agent"];
    let _ = writeln!(md, "## 5. Agent\n");
    let _ = writeln!(
        md,
        "| policy | RSS (MiB) | CPU at rest (% of a core) | start → enforcing (ms) |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    let many = format!(
        "seed, {} more workload cgroups",
        ag["bulkWorkloads"].as_u64().unwrap_or(0)
    );
    for (k, name) in [
        ("seed", "seed"),
        ("manyWorkloads", many.as_str()),
        ("tenK", "10k rules"),
    ] {
        if ag[k].is_null() {
            continue;
        }
        let _ = writeln!(
            md,
            "| {name} | {:.1} | {:.2} | {:.0} |",
            num(&ag[k]["rssMiB"]),
            num(&ag[k]["idleCpuPercent"]),
            num(&ag[k]["startToEnforcingMs"])
        );
    }
    let _ = writeln!(
        md,
        "\nStart → enforcing with 10k rules over the throughput rounds: {} ms.\n",
        s(&ag["startToEnforcingMs10k"], 0)
    );
    let sc = &r["scale"];
    if !sc.is_null() {
        let _ = writeln!(md, "## 6. A pod event in a large cluster\n");
        let _ = writeln!(
            md,
            "Pods on other nodes over {} namespaces ({} identities), {} NetworkPolicies, {} ClusterIP Services (one per app); {} events (a pod relabelled, added, deleted in turn, its Service's EndpointSlice with it) through the pod and Service indexes, the planner and the kernel datapath. \"whole list\" turns every pod and Service into planner inputs again on each event, as the agent did before it kept them between rounds.\n",
            sc["namespaces"], sc["identities"], sc["policies"], sc["services"], sc["events"]
        );
        let _ = writeln!(
            md,
            "| pods | path | start (ms) | one pod event (ms) | ipcache entries | Service frontends |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for row in sc["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} | {} |",
                row["pods"],
                row["path"].as_str().unwrap_or_default(),
                num(&row["startMs"]),
                s(&row["eventMs"], 2),
                row["ipcacheEntries"],
                row["serviceFrontends"]
            );
        }
        let _ = writeln!(
            md,
            "\nOne pod event at 50,000 pods / at 5,000: {:.2}; the whole-list path / changes at 5,000: {:.1}.\n",
            num(&sc["eventRatio50kTo5k"]),
            num(&sc["wholeListTo5kChanges"])
        );
    }
    let cl = &r["cluster"];
    if !cl.is_null() {
        let _ = writeln!(md, "## 7. The agent's own watches in a large cluster\n");
        let _ = writeln!(
            md,
            "The agent binary against an API server holding the pods on 200 other nodes (2,500 label sets over 100 namespaces, a ClusterIP Service and EndpointSlice per label set, 500 NetworkPolicies) plus the seed scenario's six pods on this node. Verdict flips are timed with real connections (logging → payment-service:443, probed every ~30 ms) from the API change; events are remote pods relabelled {} per second.\n",
            cl["sizes"][0]["eventsPerSecond"]
        );
        let _ = writeln!(
            md,
            "| pods | start → ready (ms) | RSS (MiB) | peak RSS (MiB) | CPU at rest (%) | CPU under events (%) | relabel → verdict (ms, median / max) | NetworkPolicy added / deleted → verdict (ms, median) | relabel under events (ms, median / max) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        for row in cl["sizes"].as_array().into_iter().flatten() {
            let mm = |v: &Value| format!("{:.0} / {:.0}", num(&v["median"]), num(&v["max"]));
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {} | {:.0} / {:.0} | {} |",
                row["pods"],
                num(&row["startToReadyMs"]),
                num(&row["rssMiB"]),
                num(&row["peakRssMiB"]),
                num(&row["idleCpuPercent"]),
                num(&row["eventCpuPercent"]),
                mm(&row["relabelToVerdictMs"]),
                num(&row["policyAddToVerdictMs"]["median"]),
                num(&row["policyDeleteToVerdictMs"]["median"]),
                mm(&row["relabelUnderEventsMs"]),
            );
        }
        let _ = writeln!(
            md,
            "\nLargest / smallest: RSS {:.2}, start → ready {:.2}.\n",
            num(&cl["largestOverSmallest"]["rssMiB"]),
            num(&cl["largestOverSmallest"]["startToReadyMs"])
        );
    }
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | met |");
    let _ = writeln!(md, "|---|---|---|");
    for t in r["targets"].as_array().into_iter().flatten() {
        let measured = match &t["measured"] {
            Value::String(s) => s.clone(),
            Value::Null => "–".to_owned(),
            v => format!("{:.3}", num(v)),
        };
        let met = match t["met"].as_bool() {
            Some(true) => "yes".to_owned(),
            Some(false) => format!("no ({})", t["gap"].as_str().unwrap_or("missed")),
            None => "not measured in this run".to_owned(),
        };
        let _ = writeln!(
            md,
            "| {} {} | {measured} | {met} |",
            t["what"].as_str().unwrap_or_default(),
            t["target"].as_str().unwrap_or_default()
        );
    }
    md
}

pub fn write(dir: &Path, r: &Value) -> anyhow::Result<()> {
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    Ok(())
}
