//! The layering check (`scripts/check-layers`, docs/DESIGN.md "Layers"): the real tree passes with
//! only the violations listed in scripts/layering-allowed.txt, and a fixture tree with one fault of
//! each kind (tests/layering_fixture) is refused with every fault named, so the check can fail.
//! Needs python3, as scripts/test does.

use std::process::Command;

fn check_layers(args: &[&str]) -> (bool, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/scripts/check-layers"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("running scripts/check-layers (needs python3)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_library_keeps_its_layers() {
    let (ok, text) = check_layers(&[]);
    assert!(ok, "scripts/check-layers failed:\n{text}");
}

#[test]
fn every_kind_of_fault_in_the_fixture_is_found() {
    let empty = tempfile::NamedTempFile::new().unwrap();
    let allowed = empty.path().to_str().unwrap();
    let (ok, text) = check_layers(&["--src", "tests/layering_fixture/src", "--allowed", allowed]);
    assert!(!ok, "the fixture's faults were not found:\n{text}");
    for fault in [
        "backend -> model: backend/cpu/mod.rs -> model/mod.rs",
        "model -> backend::cpu: model/block.rs -> backend/cpu/mod.rs",
        "data -> train: data/mod.rs -> train/mod.rs",
        "ffi -> a non-pub item: ffi/mod.rs -> model/mod.rs",
        "cycle: train/a.rs <-> train/b.rs",
    ] {
        assert!(text.contains(&format!("LAYERING VIOLATION: {fault}")), "not found: {fault}\n{text}");
    }
    // What is legal there stays quiet: the trait import, a public re-export used by ffi, a path in
    // a string or comment, and a unit test module reaching into a backend.
    assert_eq!(text.matches("LAYERING VIOLATION").count(), 6, "{text}");
    assert!(!text.contains("train/b.rs -> backend"), "{text}");
}

#[test]
fn a_listed_violation_that_is_gone_fails_too() {
    let mut list = tempfile::NamedTempFile::new().unwrap();
    use std::io::Write;
    writeln!(list, "data -> train: data/mod.rs -> somewhere/else.rs").unwrap();
    let (ok, text) = check_layers(&["--src", "tests/layering_fixture/src", "--allowed", list.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains(
            "FIXED, remove it from scripts/layering-allowed.txt: data -> train: data/mod.rs -> somewhere/else.rs"
        ),
        "{text}"
    );
}
