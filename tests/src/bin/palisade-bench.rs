//! `palisade-bench [--quick] [--out DIR]`: the benchmark behind
//! `cargo xtask bench` (root: it builds namespaces and cgroups, runs the
//! agent, loads iptables and nftables rules inside its own namespace).
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut only = Vec::new();
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            "--only" => only.extend(
                args.next()
                    .into_iter()
                    .flat_map(|f| f.split(',').map(str::to_owned).collect::<Vec<_>>()),
            ),
            _ => {
                eprintln!(
                    "usage: palisade-bench [--quick] [--out DIR] [--only throughput,programs,apply,audit,agent,scale]"
                );
                std::process::exit(64);
            }
        }
    }
    palisade_tests::can_run_kernel_tests().map_err(|e| anyhow::anyhow!(e))?;
    let mut opts = palisade_tests::bench::Options::new(quick, out.clone());
    opts.only = only;
    let report = palisade_tests::bench::run(opts)?;
    print!("{}", palisade_tests::bench::report::markdown(&report));
    eprintln!(
        "bench: wrote {0}/report.md, {0}/report.json, {0}/ratios.png",
        out.display()
    );
    Ok(())
}
