//! `cargo xtask vm`: the kernel matrix. Boots one of Debian's kernel packages
//! in QEMU/KVM with the host's root file system shared read-only over 9p
//! (an overlay with a tmpfs on top makes it writable inside) and runs the
//! kernel tests inside, so the same binaries are judged on 6.1, 6.12 and the
//! host's kernel. The package is downloaded and unpacked under target/vm
//! (never installed on the host); a small busybox initramfs loads the
//! virtio, 9p and overlay modules and switches into the shared root.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{root_dir, run, step};

/// Modules the initramfs loads before the shared root can be mounted (the
/// rest are loaded on demand by the kernel through the host's kmod).
const EARLY_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// The series `cargo xtask test` boots, and the tests it runs in each.
pub const MATRIX: [&str; 2] = ["6.1", "6.12"];
pub const MATRIX_TESTS: [&str; 3] = [
    "payment_service_networkpolicy_is_enforced_ipv4_and_ipv6_with_audit",
    "pins_removed_or_programs_detached_under_a_running_agent_are_repaired",
    // The host's kernel has no SCTP; the guests' kernels do.
    "sctp_is_judged_at_connect_and_at_the_receiver",
];

// /tmp is not a fresh tmpfs inside: the repository may live there (a CI
// clone); the overlay's tmpfs upper layer keeps the guest's writes anyway.

/// How long one VM may run before it is stopped and the run fails.
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The newest signed amd64 image package of a kernel series, e.g. `6.1` →
/// `linux-image-6.1.0-57-amd64`, `6.12` → `linux-image-6.12.117+deb12-amd64`.
fn image_package(series: &str) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["pkgnames", &format!("linux-image-{series}.")])
        .output()
        .context("apt-cache (Debian's apt) is needed to find the kernel packages")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|n| {
            n.ends_with("-amd64")
                && !["cloud", "-rt-", "dbg", "unsigned"]
                    .iter()
                    .any(|x| n.contains(x))
        })
        .collect();
    names.sort_by_key(|a| natural(a));
    names.pop().with_context(|| {
        format!("no linux-image-{series}.*-amd64 package in apt's lists: run `apt-get update`, or pick a series apt offers (6.1, 6.12)")
    })
}

/// Sort key comparing digit runs as numbers (6.12.9 < 6.12.117).
fn natural(s: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits > 0 {
            out.push((rest[..digits].parse().unwrap_or(0), String::new()));
            rest = &rest[digits..];
        } else {
            let other = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            out.push((0, rest[..other].to_owned()));
            rest = &rest[other..];
        }
    }
    out
}

/// Downloads and unpacks `package` under target/vm/<package> (once);
/// returns (that directory, the kernel release).
fn unpack(package: &str) -> anyhow::Result<(PathBuf, String)> {
    let dir = root_dir().join("target/vm").join(package);
    let release = package
        .strip_prefix("linux-image-")
        .context("not a linux-image package")?
        .to_owned();
    let done = dir.join(".unpacked");
    if done.exists() {
        step(&format!("{package}: unpacked in {}", dir.display()));
        return Ok((dir, release));
    }
    let debs = root_dir().join("target/vm/debs");
    std::fs::create_dir_all(&debs)?;
    step(&format!(
        "downloading {package} (not installed: unpacked under target/vm)"
    ));
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&debs))?;
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .context("apt-get download left no .deb")?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))
        .context("depmod (Debian's kmod) indexes the modules")?;
    std::fs::write(&done, "")?;
    let _ = std::fs::remove_file(&deb);
    Ok((dir, release))
}

/// The kernel tests' executable (built if needed).
fn kernel_test_binary() -> anyhow::Result<PathBuf> {
    let out = Command::new("cargo")
        .current_dir(root_dir())
        .args([
            "test",
            "--release",
            "-p",
            "palisade-tests",
            "--test",
            "kernel",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"name\":\"kernel\""))
        .find_map(|l| {
            let rest = l.split("\"executable\":\"").nth(1)?;
            Some(PathBuf::from(&rest[..rest.find('"')?]))
        })
        .context("cargo did not report the kernel tests' executable")
}

/// The initramfs: busybox, the early modules (decompressed) and /init.
fn initramfs(dir: &Path, release: &str, inner: &str, out: &Path) -> anyhow::Result<()> {
    let root = out.with_extension("d");
    let _ = std::fs::remove_dir_all(&root);
    for sub in [
        "bin", "modules", "proc", "sys", "dev", "lower", "upper", "newroot",
    ] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("busybox-static provides the initramfs's shell")?;
    let deps = Command::new("modprobe")
        .arg("-d")
        .arg(dir)
        .args(["-S", release, "--show-depends", "-a"])
        .args(EARLY_MODULES)
        .output()
        .context("modprobe (kmod)")?;
    if !deps.status.success() {
        bail!(
            "resolving {EARLY_MODULES:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&deps.stderr)
        );
    }
    let mut order = String::new();
    for line in String::from_utf8_lossy(&deps.stdout).lines() {
        let Some(path) = line.strip_prefix("insmod ") else {
            continue; // "builtin …"
        };
        let path = path.split_whitespace().next().unwrap_or(path);
        let name = Path::new(path)
            .file_name()
            .context("module path")?
            .to_string_lossy()
            .trim_end_matches(".xz")
            .to_owned();
        if order.lines().any(|l| l == name) {
            continue;
        }
        let target = root.join("modules").join(&name);
        if path.ends_with(".xz") {
            let plain = Command::new("xz").args(["-dc", path]).output()?;
            anyhow::ensure!(plain.status.success(), "xz -d {path}");
            std::fs::write(&target, plain.stdout)?;
        } else {
            std::fs::copy(path, &target)?;
        }
        order.push_str(&name);
        order.push('\n');
    }
    std::fs::write(root.join("modules/order"), order)?;
    std::fs::write(root.join("inner.sh"), inner)?;
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /lower || {{ echo PALISADE_VM_EXIT=97; echo o > /proc/sysrq-trigger; }}
mount -t tmpfs -o size=2g tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || {{ echo PALISADE_VM_EXIT=98; echo o > /proc/sysrq-trigger; }}
mkdir -p /newroot/lib/modules/{release}
mount -t 9p -o trans=virtio,version=9p2000.L,ro modules /newroot/lib/modules/{release}
cp /inner.sh /newroot/palisade-vm-inner.sh
umount /proc /sys /dev
exec switch_root /newroot /bin/sh /palisade-vm-inner.sh
"#
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init)?;
    run(Command::new("chmod").arg("755").arg(&init_path))?;
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | busybox cpio -o -H newc --quiet > '{}'",
        root.display(),
        out.display()
    )))?;
    Ok(())
}

/// KVM where it can boot a stock kernel; else QEMU's software emulation.
/// `PALISADE_VM_ACCEL=kvm|tcg` overrides.
fn accelerator() -> (&'static str, &'static str) {
    match std::env::var("PALISADE_VM_ACCEL").as_deref() {
        Ok("kvm") => return ("kvm", "PALISADE_VM_ACCEL"),
        Ok("tcg") => return ("tcg", "PALISADE_VM_ACCEL"),
        _ => {}
    }
    if !Path::new("/dev/kvm").exists() {
        ("tcg", "no /dev/kvm")
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        // PVM (kvm_pvm) runs only PVM-built guest kernels: a stock Debian
        // kernel hangs right after its decompressor.
        (
            "tcg",
            "this /dev/kvm is PVM, which boots only PVM-built guest kernels",
        )
    } else {
        ("kvm", "/dev/kvm")
    }
}

/// Runs the kernel tests (with `filter`) in a VM booting kernel `series`
/// (`host`: on this machine's kernel, no VM).
pub fn vm(series: &str, filter: &[String]) -> anyhow::Result<()> {
    let binary = kernel_test_binary()?;
    let bin_dir = root_dir().join("target/release");
    if series == "host" {
        step("kernel tests on the host's kernel");
        return run(Command::new(&binary)
            .args(["--test-threads=1"])
            .args(filter)
            .env("PALISADE_BIN_DIR", &bin_dir));
    }
    // apt's lists may be missing or stale (a package version gone from the
    // mirror): refresh them once and try again.
    let (dir, release) = match image_package(series).and_then(|p| unpack(&p)) {
        Ok(found) => found,
        Err(e) => {
            step(&format!("{e:#}; refreshing apt's lists and trying again"));
            run(Command::new("apt-get").args(["update", "-q"]))?;
            unpack(&image_package(series)?)?
        }
    };
    let package = format!("linux-image-{release}");
    let kernel = dir.join("boot").join(format!("vmlinuz-{release}"));
    let modules = dir.join("lib/modules").join(&release);
    let quoted: Vec<String> = filter
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "")))
        .collect();
    let inner = format!(
        r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run
mount -t cgroup2 none /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs none /sys/kernel/security 2>/dev/null
ip link set lo up
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root CI={ci} PALISADE_VM=1 PALISADE_BIN_DIR='{bins}' RUST_BACKTRACE=1
cd '{root}'
echo "PALISADE_VM_KERNEL=$(uname -r)"
echo "PALISADE_VM_LSM=$(cat /sys/kernel/security/lsm 2>/dev/null)"
'{binary}' --test-threads=1 {filter}
echo "PALISADE_VM_EXIT=$?"
echo o > /proc/sysrq-trigger
sleep 10
"#,
        ci = std::env::var("CI").unwrap_or_default(),
        bins = bin_dir.display(),
        root = root_dir().display(),
        binary = binary.display(),
        filter = quoted.join(" "),
    );
    let image = root_dir()
        .join("target/vm")
        .join(format!("{package}.initramfs.cpio"));
    initramfs(&dir, &release, &inner, &image)?;
    step(&format!(
        "booting {release} (QEMU/KVM) and running the kernel tests inside"
    ));
    let (accel, why) = accelerator();
    step(&format!("QEMU accelerator: {accel} ({why})"));
    let accel_args: &[&str] = if accel == "kvm" {
        &["-enable-kvm", "-cpu", "host"]
    } else {
        &["-accel", "tcg,thread=multi", "-cpu", "max"]
    };
    let mut child = Command::new("qemu-system-x86_64")
        .args(accel_args)
        .args(["-m", "3072", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&image)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=modules,security_model=none,readonly=on",
            modules.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("qemu-system-x86_64 (Debian's qemu-system-x86)")?;
    let stdout = child.stdout.take().context("qemu's output")?;
    let pid = child.id();
    let started = Instant::now();
    let watchdog = std::thread::spawn(move || {
        while started.elapsed() < VM_TIMEOUT {
            std::thread::sleep(Duration::from_secs(1));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        // Our own child, by pid.
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let (mut exit, mut booted) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("  vm| {line}");
        // The console may put escape codes before a line: search in it.
        let value = |marker: &str| line.split(marker).nth(1).map(|v| v.trim().to_owned());
        if let Some(code) = value("PALISADE_VM_EXIT=") {
            exit = code.parse::<i32>().ok();
        }
        if let Some(k) = value("PALISADE_VM_KERNEL=") {
            booted = Some(k);
        }
    }
    let _ = child.wait();
    let _ = watchdog.join();
    match (exit, booted) {
        (Some(0), Some(k)) => {
            step(&format!("kernel tests passed on {k}"));
            Ok(())
        }
        (Some(code), k) => bail!(
            "kernel tests failed on {} (exit {code})",
            k.unwrap_or(release)
        ),
        (None, _) => bail!(
            "the VM with {release} stopped without reporting a result (boot failure or timeout after {VM_TIMEOUT:?}); its console is above"
        ),
    }
}
