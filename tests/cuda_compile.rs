//! Compiles every embedded kernel file (`cuda/*.cu`) with NVRTC for sm_80, sm_90 and sm_90a, through
//! the same code path the runtime uses (`nvrtc::compile`), without a GPU. Run by
//! `scripts/check-kernels`, which provides NVRTC and the CUDA headers from the PyPI wheels;
//! ignored in a plain `cargo test` because it needs libnvrtc.so.13.
//!
//! Fails on any compile error and on any local-memory spill ptxas reports (a spill in these
//! kernels means a register budget was blown: slow, and always a mistake worth seeing).

use beit::backend::cuda::nvrtc::{self, Arch};

// sm_90a is what an H100/H200 run compiles for (nvrtc::Arch::for_compute_capability).
const ARCHS: [&str; 3] = ["sm_80", "sm_90", "sm_90a"];

#[test]
#[ignore = "needs NVRTC (libnvrtc.so.13) and CUDA headers: run scripts/check-kernels"]
fn every_kernel_compiles_for_sm80_and_sm90() {
    assert!(nvrtc::nvrtc_present(), "libnvrtc.so.13 cannot be loaded: put its directory on LD_LIBRARY_PATH");
    let version = nvrtc::nvrtc_version().expect("NVRTC version");
    let includes = nvrtc::cuda_include_dirs();
    assert!(!includes.is_empty(), "no CUDA include directory with cuda_bf16.h: set BEIT_CUDA_INCLUDE");
    println!("NVRTC {}.{}, headers from {}", version.0, version.1, includes[0].display());
    let files: Vec<&str> = nvrtc::kernel_files().collect();
    assert!(!files.is_empty(), "no embedded kernel file");
    let mut failures = Vec::new();
    let mut saw_ptxas_report = false;
    for file in &files {
        for arch in ARCHS {
            match nvrtc::compile(file, &Arch(arch.to_string())) {
                Ok(c) => {
                    let spills = c.spill_bytes;
                    saw_ptxas_report |= spills.is_some();
                    println!(
                        "ok   {file:<22} {arch}  cubin {:>8} bytes  spills {}",
                        c.cubin.len(),
                        spills.map_or("(no ptxas report)".to_string(), |s| format!("{s} bytes"))
                    );
                    if !c.cubin.starts_with(b"\x7fELF") {
                        failures.push(format!("{file} {arch}: NVRTC returned no ELF cubin"));
                    }
                    if spills.unwrap_or(0) > 0 {
                        failures.push(format!(
                            "{file} {arch}: {} bytes of local-memory spills\n{}",
                            spills.unwrap(),
                            c.log
                        ));
                    }
                }
                Err(e) => {
                    println!("FAIL {file:<22} {arch}");
                    failures.push(format!("{file} {arch}: {e}"));
                }
            }
        }
    }
    if !saw_ptxas_report {
        println!("note: NVRTC's log carried no ptxas report, so spills were not checked");
    }
    assert!(failures.is_empty(), "{} kernel compile(s) failed:\n{}", failures.len(), failures.join("\n\n"));
    println!("{} kernel files x {} architectures compiled", files.len(), ARCHS.len());
}

#[test]
#[ignore = "needs NVRTC (libnvrtc.so.13) and CUDA headers: run scripts/check-kernels"]
fn compiled_kernels_are_cached_on_disk_by_arch() {
    assert!(nvrtc::nvrtc_present(), "libnvrtc.so.13 cannot be loaded: put its directory on LD_LIBRARY_PATH");
    let dir = tempfile::tempdir().unwrap();
    // Only this test reads the variable, and nvrtc::cache_dir() reads it at each call.
    std::env::set_var("BEIT_CACHE_DIR", dir.path());
    let file = nvrtc::kernel_files().next().expect("a kernel file");
    let arch = Arch("sm_80".into());
    let first = nvrtc::compile_cached(file, &arch).expect("compile");
    assert!(!first.from_cache, "an empty cache cannot hit");
    let entries: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(entries.len(), 1, "one cubin stored: {entries:?}");
    let (major, minor) = nvrtc::nvrtc_version().unwrap();
    let stem = file.trim_end_matches(".cu");
    assert!(entries[0].starts_with(&format!("{stem}-sm_80-nvrtc{major}.{minor}-")), "{entries:?}");
    let second = nvrtc::compile_cached(file, &arch).expect("cached");
    assert!(second.from_cache, "the second compile must come from the cache");
    assert_eq!(first.cubin, second.cubin);
    // Another architecture is another entry, compiled afresh.
    let other = nvrtc::compile_cached(file, &Arch("sm_90".into())).expect("compile sm_90");
    assert!(!other.from_cache);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    println!("cache: {} -> {} entries in {}", file, 2, dir.path().display());
}
