//! Makes cargo rebuild the eBPF object when bpf-linker changes (it is the linker
//! for the bpf targets, so cargo does not track it on its own).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo::rerun-if-changed={}", linker.display());
    }
}
