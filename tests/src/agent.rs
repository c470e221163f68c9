//! Runs the real `palisade agent` for a world: writes its config, starts it,
//! waits until it enforces every pod, reads its audit log, stops it.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::world::World;

pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    pub audit_path: PathBuf,
    /// Arguments after `agent --config <file>` (e.g. `--kubernetes`).
    pub args: Vec<String>,
    /// The network namespace (under /run/netns) the agent runs in, as on a
    /// node whose namespace is the world's hub; `None`: the test's own.
    pub netns: Option<String>,
    log: Arc<Mutex<Vec<String>>>,
}

/// The agent config for `world`: pods are `<root>/<namespace>/<name>`, labelled
/// `app=<name>`; `extra` is appended verbatim (namespaces, peers).
pub fn config_for(world: &World, policy_dir: &Path, audit_path: &Path, extra: &str) -> String {
    config_with_rules(world, policy_dir, audit_path, "", extra)
}

/// Like `config_for`, with workload `rules` (YAML list items) tried before the default one.
pub fn config_with_rules(
    world: &World,
    policy_dir: &Path,
    audit_path: &Path,
    rules: &str,
    extra: &str,
) -> String {
    format!(
        "cgroupRoot: {root}\nbpfPinDir: /sys/fs/bpf/palisade-test-{tag}\ncontrolSocket: {socket}\npolicyDir: {policy}\naudit:\n  output: {audit}\nrescanIntervalMs: 100\n\
         workloads:\n{rules}  - path: \"{{ns}}/{{app}}\"\n    namespace: \"{{ns}}\"\n    labels:\n      app: \"{{app}}\"\n{extra}",
        root = world.cgroup_root.display(),
        tag = world.tag,
        socket = audit_path.with_file_name("palisade.sock").display(),
        policy = policy_dir.display(),
        audit = audit_path.display(),
    )
}

/// Runs the `palisade` CLI against the agent listening on `socket`:
/// (exit status, stdout, stderr).
pub fn cli_at(socket: &Path, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(crate::bin_dir().join("palisade"))
        .args(args)
        .env("PALISADE_SOCKET", socket)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `palisade status --json` of the agent listening on `socket` (any exit
/// status: 2 only means "not ready").
pub fn status_at(socket: &Path) -> anyhow::Result<serde_json::Value> {
    let (_, out, err) = cli_at(socket, &["status", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("palisade status --json: {err}"))
}

impl Agent {
    /// Starts the agent with `config` in a fresh directory under `dir`.
    pub fn start(dir: &Path, config: &str) -> anyhow::Result<Agent> {
        Agent::start_with_args(dir, config, &[])
    }

    /// Like `start`, with extra command-line arguments for `palisade agent`.
    pub fn start_with_args(dir: &Path, config: &str, args: &[&str]) -> anyhow::Result<Agent> {
        let mut agent = Agent::prepare(dir, config, args)?;
        agent.spawn()?;
        Ok(agent)
    }

    /// Like `start`, with the agent in network namespace `netns` (entered
    /// with `nsenter --net`, which keeps the cgroup tree in view).
    pub fn start_in_netns(dir: &Path, config: &str, netns: &str) -> anyhow::Result<Agent> {
        let mut agent = Agent::prepare(dir, config, &[])?;
        agent.netns = Some(netns.to_owned());
        agent.spawn()?;
        Ok(agent)
    }

    /// Writes the config; the agent is not started yet.
    fn prepare(dir: &Path, config: &str, args: &[&str]) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(dir)?;
        let config_path = dir.join("agent.yaml");
        std::fs::write(&config_path, config)?;
        let audit_path = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("output: "))
            .map(PathBuf::from)
            .context("config has no audit output")?;
        Ok(Agent {
            child: None,
            dir: dir.to_owned(),
            audit_path,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            netns: None,
            log: Arc::new(Mutex::new(Vec::new())),
        })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("agent.yaml")
    }

    /// Starts the agent process (again), logging into the same log.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = crate::bin_dir().join("palisade");
        let mut cmd = match &self.netns {
            // nsenter execs the agent: the child's pid is the agent's.
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = cmd
            .args(["agent", "--config"])
            .arg(self.config_path())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting palisade agent")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let sink = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("PALISADE_TEST_VERBOSE").is_some() {
                    eprintln!("agent: {line}");
                }
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        self.child = Some(child);
        Ok(())
    }

    /// The agent process's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the agent gets no chance to clean anything up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `palisade cleanup`: removes the pins (and so the attachments) the
    /// agent leaves behind on purpose.
    pub fn cleanup(&self) -> anyhow::Result<String> {
        let out = Command::new(crate::bin_dir().join("palisade"))
            .args(["cleanup", "--config"])
            .arg(self.config_path())
            .output()
            .context("running palisade cleanup")?;
        if !out.status.success() {
            anyhow::bail!(
                "palisade cleanup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log has a line containing every one of `needles`.
    pub fn wait_for_log(&mut self, needles: &[&str], timeout: Duration) -> anyhow::Result<()> {
        self.poll(&format!("logging {needles:?}"), timeout, |agent| {
            let found = agent
                .log()
                .iter()
                .any(|l| needles.iter().all(|n| l.contains(n)));
            if found { Ok(()) } else { Err(String::new()) }
        })
    }

    /// Calls `check` every 20 ms until it gives a value (`Err`: what it saw
    /// so far, for the timeout's message); fails early if the agent exits.
    fn poll<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Agent) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = match check(self) {
                Ok(v) => return Ok(v),
                Err(seen) => seen,
            };
            if let Some(child) = &mut self.child
                && let Some(exit) = child.try_wait()?
            {
                bail!(
                    "agent exited ({exit}) before {what}:\n{}",
                    self.log().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not show {what} within {timeout:?}{seen}\n{}",
                    self.log().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the status shows a first state applied (the kernel
    /// enforces what the agent planned); fails early if the agent exits.
    pub fn wait_applied(&mut self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        self.wait_status("a state applied", timeout, |s| s["applied"] == true)
    }

    /// Waits until the status lists a workload whose name or cgroup path
    /// contains `needle` (with `address` among its addresses, when given).
    pub fn wait_workload(
        &mut self,
        needle: &str,
        address: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let what = format!("workload {needle} {}", address.unwrap_or(""));
        self.wait_status(&what, timeout, |s| {
            s["workload_list"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|w| {
                    let named = [&w["name"], &w["cgroup"]]
                        .iter()
                        .any(|v| v.as_str().is_some_and(|t| t.contains(needle)));
                    let addressed = address.is_none_or(|a| {
                        w["addresses"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|x| x == a)
                    });
                    named && addressed
                })
        })
    }

    /// Polls the status until `pred` holds (the last status in the error on
    /// timeout), failing early if the agent exits.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        self.poll(
            &format!("{what} in its status"),
            timeout,
            |agent| match agent.status() {
                Ok(s) if pred(&s) => Ok(s),
                Ok(s) => Err(format!("; last status: {s}")),
                Err(e) => Err(format!("; last status: {e}")),
            },
        )
    }

    /// Waits until the agent enforces every pod of `world` with its addresses.
    pub fn wait_enforcing(&mut self, world: &World) -> anyhow::Result<()> {
        // The kernel's verifier takes a while under software emulation
        // (the kernel matrix's VMs): about 0.3 s on this host, tens of
        // seconds there.
        self.wait_applied(Duration::from_secs(90))?;
        for pod in &world.pods {
            if pod.spec.namespace == "-" {
                continue;
            }
            let addr = if pod.ipv4.is_unspecified() {
                pod.ipv6.to_string()
            } else {
                pod.ipv4.to_string()
            };
            self.wait_workload(&pod.spec.key(), Some(&addr), Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Runs the `palisade` CLI against this agent's control socket:
    /// (exit status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        cli_at(&self.dir.join("palisade.sock"), args)
    }

    /// `palisade status --json` through the control socket (any exit
    /// status: 2 only means "not ready").
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        status_at(&self.dir.join("palisade.sock"))
    }

    /// Audit events written so far, parsed.
    pub fn audit_events(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = match std::fs::read_to_string(&self.audit_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("audit line is not JSON: {l}"))
            })
            .collect()
    }

    /// Waits until an audit event satisfies `pred`.
    pub fn wait_for_event(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.audit_events()?.into_iter().find(|e| pred(e)) {
                return Ok(ev);
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching audit event within {timeout:?}; events:\n{}",
                    self.audit_events()?
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGTERM, then wait; returns whether it exited with status 0.
    pub fn stop(&mut self) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                self.cleanup()?;
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent did not stop within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        let _ = self.cleanup();
    }
}
