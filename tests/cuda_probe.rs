//! The CUDA probe and the device choice, on whatever machine runs the tests. On a machine
//! without a GPU (CI) these check that nothing panics, that `auto` falls back to the CPU saying
//! why, and that `cuda` is a clear error through the Rust and the C API; on a GPU machine the
//! same tests check the positive side. Also: the library does not link CUDA.

use std::ffi::CStr;

use beit::backend::cuda::{probe, CudaDevice};
use beit::ffi::context::{
    beit_context, beit_context_create, beit_context_free, beit_context_options_default, beit_device,
};
use beit::ffi::device::{beit_device_info_default, beit_get_device_info};
use beit::ffi::status::{beit_last_error_message, beit_status};
use beit::{Context, ContextOptions, Device, Error};

fn driver_library_present() -> bool {
    // SAFETY: dlopen attempts only.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

#[test]
fn probe_gives_a_consistent_report() {
    let r = probe();
    assert!(!r.reason.is_empty(), "the probe must always say something");
    if r.usable {
        let gpu = r.gpu.as_ref().expect("a usable probe names its GPU");
        assert!(r.device_count >= 1 && r.driver_version >= 13000 && r.nvrtc_version.is_some());
        assert!(gpu.compute_capability >= (8, 0) && gpu.total_memory > 0);
        assert!(r.reason.contains(&gpu.name), "{}", r.reason);
    } else if std::env::var("BEIT_DISABLE_CUDA").is_ok_and(|v| !v.is_empty() && v != "0") {
        assert!(r.reason.contains("BEIT_DISABLE_CUDA"), "{}", r.reason);
    } else if !driver_library_present() {
        assert!(r.reason.contains("libcuda"), "the reason must name the missing driver library: {}", r.reason);
        assert_eq!((r.device_count, r.driver_version), (0, 0));
        assert!(r.gpu.is_none());
    }
    // The report is computed once: a second call returns the same object.
    assert!(std::ptr::eq(r, probe()));
}

#[test]
fn device_cuda_is_a_clear_error_without_a_gpu() {
    let r = probe();
    let result = Context::new(&ContextOptions { device: Device::Cuda, threads: 1, ..Default::default() });
    if r.usable {
        let ctx = result.expect("device cuda with a usable GPU");
        assert_eq!(ctx.device(), Device::Cuda);
        assert!(CudaDevice::get().is_ok(), "the ops' device is still there for the backend");
    } else {
        match result {
            Err(Error::Unsupported(msg)) => {
                assert!(msg.contains("device cuda requested"), "{msg}");
                assert!(msg.contains(&r.reason), "the error must carry the probe's reason: {msg}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        match CudaDevice::get() {
            Err(Error::Unsupported(msg)) => assert!(msg.contains(&r.reason), "{msg}"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
fn auto_says_what_it_chose() {
    let r = probe();
    let ctx = Context::new(&ContextOptions { device: Device::Auto, threads: 1, ..Default::default() })
        .expect("auto never fails");
    if r.usable {
        assert_eq!(ctx.device(), Device::Cuda);
        assert!(ctx.device_note().starts_with("auto: using cuda"), "{}", ctx.device_note());
    } else {
        // Without a GPU (CI): the CPU, and the note carries the probe's reason.
        assert_eq!(ctx.device(), Device::Cpu);
        assert!(ctx.device_note().starts_with("auto: using cpu because"), "{}", ctx.device_note());
        assert!(ctx.device_note().contains(&r.reason), "{}", ctx.device_note());
    }
    let cpu = Context::new(&ContextOptions { device: Device::Cpu, threads: 1, ..Default::default() }).unwrap();
    assert_eq!(cpu.device(), Device::Cpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_index_picks_a_gpu_and_a_process_keeps_one() {
    // With a GPU (or the mock stack): an index past the driver's count is a clear error for
    // cuda and the CPU for auto; once GPU 0 is open, naming another is refused.
    let r = probe();
    assert!(r.usable, "this test needs a usable CUDA device: {}", r.reason);
    let count = r.device_count as usize;
    let past = ContextOptions { device: Device::Cuda, threads: 1, device_index: count, ..Default::default() };
    match Context::new(&past) {
        Err(Error::Unsupported(msg)) => assert!(msg.contains(&format!("the driver sees {count}")), "{msg}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let auto = Context::new(&ContextOptions { device: Device::Auto, ..past.clone() }).unwrap();
    assert_eq!(auto.device(), Device::Cpu, "{}", auto.device_note());
    assert!(auto.device_note().contains(&format!("GPU {count} could not be opened")), "{}", auto.device_note());
    let zero = Context::new(&ContextOptions { device_index: 0, ..past.clone() }).unwrap();
    assert!(zero.device_note().contains("GPU 0"), "{}", zero.device_note());
    if count > 1 {
        match Context::new(&ContextOptions { device_index: 1, ..past }) {
            Err(Error::Unsupported(msg)) => assert!(msg.contains("already uses GPU 0"), "{msg}"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn auto_picks_cuda_when_usable() {
    // With a GPU (or the mock CUDA stack): auto is a cuda context, through the Rust API and the
    // C API, and says so; the C API's device info reports cuda as what auto picks.
    assert!(probe().usable, "this test needs a usable CUDA device: {}", probe().reason);
    let ctx = Context::new(&ContextOptions { device: Device::Auto, threads: 1, ..Default::default() }).unwrap();
    assert_eq!(ctx.device(), Device::Cuda, "{}", ctx.device_note());
    let name = CudaDevice::get().unwrap().info().name.clone();
    assert!(ctx.device_note().starts_with("auto: using cuda") && ctx.device_note().contains(name.as_str()));
    let mut info = beit_device_info_default();
    assert_eq!(unsafe { beit_get_device_info(&mut info) }, beit_status::BEIT_OK);
    assert_eq!(info.kind.0, beit_device::BEIT_DEVICE_CUDA as u32);
    let mut opts = beit_context_options_default();
    opts.device = beit::ffi::context::RawDevice(beit_device::BEIT_DEVICE_AUTO as u32);
    let mut raw: *mut beit_context = std::ptr::null_mut();
    assert_eq!(unsafe { beit_context_create(&opts, &mut raw) }, beit_status::BEIT_OK);
    unsafe { beit_context_free(raw) };
}

#[test]
fn c_api_device_cuda_error_and_device_info() {
    let r = probe();
    let mut opts = beit_context_options_default();
    opts.device = beit::ffi::context::RawDevice(beit_device::BEIT_DEVICE_CUDA as u32);
    let mut ctx: *mut beit_context = std::ptr::null_mut();
    let status = unsafe { beit_context_create(&opts, &mut ctx) };
    if r.usable {
        assert_eq!(status, beit_status::BEIT_OK);
        unsafe { beit_context_free(ctx) };
    } else {
        assert_eq!(status, beit_status::BEIT_ERR_UNSUPPORTED);
        assert!(ctx.is_null(), "out is written only on success");
        let msg = unsafe { CStr::from_ptr(beit_last_error_message()) }.to_string_lossy().into_owned();
        assert!(msg.contains("device cuda requested") && msg.contains(&r.reason), "{msg}");
    }

    let mut info = beit_device_info_default();
    assert_eq!(unsafe { beit_get_device_info(&mut info) }, beit_status::BEIT_OK);
    assert_eq!(info.struct_size, std::mem::size_of_val(&info));
    assert_eq!(info.cuda_usable, u32::from(r.usable));
    // `kind` is what auto picks: CUDA when usable.
    let auto = if r.usable { beit_device::BEIT_DEVICE_CUDA } else { beit_device::BEIT_DEVICE_CPU };
    assert_eq!(info.kind.0, auto as u32);
    let reason = unsafe { CStr::from_ptr(info.reason.as_ptr()) }.to_str().unwrap().to_string();
    assert!(!reason.is_empty() && r.reason.starts_with(&reason), "{reason:?} vs {:?}", r.reason);
    let name = unsafe { CStr::from_ptr(info.name.as_ptr()) }.to_str().unwrap().to_string();
    match &r.gpu {
        Some(gpu) => {
            assert_eq!(name, gpu.name);
            assert_eq!((info.compute_capability_major, info.compute_capability_minor), gpu.compute_capability);
        }
        None => {
            assert_eq!(name, "cpu");
            assert_eq!(info.total_memory, 0);
        }
    }
    // A struct from an older, smaller header is refused; NULL is refused.
    let mut small = beit_device_info_default();
    small.struct_size = 8;
    assert_eq!(unsafe { beit_get_device_info(&mut small) }, beit_status::BEIT_ERR_INVALID_ARGUMENT);
    assert_eq!(unsafe { beit_get_device_info(std::ptr::null_mut()) }, beit_status::BEIT_ERR_NULL_POINTER);
}

/// The NEEDED entries of an ELF file, by `readelf -d`.
fn needed_libraries(path: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(path)
        .output()
        .expect("readelf (binutils) must be installed for this test");
    assert!(out.status.success(), "readelf -d {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect()
}

#[test]
fn no_cuda_library_is_linked() {
    // The beit binary links the whole library statically; libbeit.so sits beside it once
    // `cargo build --release` has run (checked too when present).
    // BEIT_BIN: where scripts/gpu-check put the binary on a machine the tests were copied to.
    let bin =
        std::path::PathBuf::from(std::env::var("BEIT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_beit").to_string()));
    let mut files = vec![bin.clone()];
    let so = bin.parent().unwrap().join("libbeit.so");
    if so.exists() {
        files.push(so);
    }
    for file in files {
        let needed = needed_libraries(&file);
        assert!(needed.iter().any(|n| n.starts_with("libc.so")), "readelf parsing: {needed:?}");
        for lib in &needed {
            let lower = lib.to_lowercase();
            assert!(
                !["libcuda", "libcudart", "libcublas", "libnvrtc", "libnvidia"].iter().any(|c| lower.starts_with(c)),
                "{} links {lib}: CUDA must be loaded at run time only",
                file.display()
            );
        }
    }
}
