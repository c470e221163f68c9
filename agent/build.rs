//! Builds the eBPF object (`ebpf/`) for the bpf target with the pinned
//! toolchain and bpf-linker, so `cargo build`, `cargo test` and `cargo clippy`
//! work with no other step. The object is embedded by `src/datapath/mod.rs`.
//! See ARCHITECTURE.md, "Why build.rs".
fn main() -> anyhow::Result<()> {
    // The eBPF crate needs `-Z build-std=core`; on the pinned stable toolchain
    // that takes RUSTC_BOOTSTRAP, as the Linux kernel's own Rust build does.
    // Set only for the nested cargo that aya-build runs.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "palisade-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("1.98.0"))
}
