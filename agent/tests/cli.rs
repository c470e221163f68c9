//! The `palisade` binary as a user runs it (no root needed).
use std::process::Command;

fn palisade(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_check_accepts_the_examples_and_locates_every_problem() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let (code, out, _) = palisade(&[
        "policy",
        "check",
        &format!("{root}/policies/kubernetes"),
        &format!("{root}/policies/palisade"),
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("ok: 2 policies in 2 files"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: y}\nspec:\n  podSelector: {}\n  \
         ingress:\n  - ports: [{port: 0}, {port: 80, endPort: 79}]\n",
    )
    .unwrap();
    let (code, out, err) = palisade(&["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "non-zero exit on a bad file");
    assert!(out.is_empty());
    let lines: Vec<&str> = err.lines().collect();
    let file = bad.display().to_string();
    assert_eq!(
        lines,
        [
            format!(
                "{file}:7:20: spec.ingress[0].ports[0].port: 0 is out of range: must be between 1 and 65535, inclusive"
            ),
            format!(
                "{file}:7:44: spec.ingress[0].ports[1].endPort: 79 must be greater than or equal to port (80)"
            ),
        ]
    );
}

#[test]
fn help_explains_the_commands() {
    let (code, out, _) = palisade(&["--help"]);
    assert_eq!(code, 0);
    for word in ["agent", "policy", "explain", "simulate"] {
        assert!(out.contains(word), "--help lists {word}:\n{out}");
    }
}

#[test]
fn policy_check_reads_subdirectories_and_refuses_to_find_nothing() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    // The repository's own policies live in subdirectories.
    let (code, out, err) = palisade(&["policy", "check", &format!("{root}/policies")]);
    assert_eq!(code, 0, "{err}");
    let files: usize = out
        .split_whitespace()
        .nth(4)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(files >= 4, "every file below policies/: {out}");

    // A ConfigMap volume keeps each file twice, once under `..data/`: read once.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("..data");
    std::fs::create_dir_all(&data).unwrap();
    let doc = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: y}\nspec: {podSelector: {}}\n";
    std::fs::write(data.join("p.yaml"), doc).unwrap();
    std::os::unix::fs::symlink("..data/p.yaml", dir.path().join("p.yaml")).unwrap();
    let (code, out, err) = palisade(&["policy", "check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok: 1 policies in 1 files"), "{out}");

    let empty = tempfile::tempdir().unwrap();
    let (code, out, err) = palisade(&["policy", "check", empty.path().to_str().unwrap()]);
    assert_eq!(code, 1, "finding no policy file is an error");
    assert!(out.is_empty() && err.contains("no policy file"), "{err}");
}
