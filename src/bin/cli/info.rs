//! `beit info`: what this machine offers libbeit (the device `auto` picks and why), as JSON.

use beit::backend::cuda::{nvrtc, probe};

/// Prints one JSON object on stdout. Never fails: a machine without CUDA is described, not an
/// error.
pub fn info() -> beit::Result<()> {
    let report = probe::probe();
    let gpu = report.gpu.as_ref().map(|g| {
        serde_json::json!({
            "name": g.name,
            "compute_capability": format!("{}.{}", g.compute_capability.0, g.compute_capability.1),
            "total_memory_bytes": g.total_memory,
            "kernel_arch": nvrtc::Arch::for_compute_capability(g.compute_capability.0, g.compute_capability.1).name(),
        })
    });
    let value = serde_json::json!({
        "version": beit::VERSION,
        "device": if report.usable { "cuda" } else { "cpu" },
        "cuda_usable": report.usable,
        "reason": report.reason,
        "driver_cuda_version": (report.driver_version > 0).then(|| probe::version_text(report.driver_version)),
        "device_count": report.device_count,
        "gpu": gpu,
        "nvrtc_version": report.nvrtc_version.map(|(a, b)| format!("{a}.{b}")),
        "cuda_include_dirs": nvrtc::cuda_include_dirs().iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "kernel_cache_dir": nvrtc::cache_dir().map(|d| d.display().to_string()),
        "kernel_files": nvrtc::kernel_files().collect::<Vec<_>>(),
        "cpu_threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    println!("{value}");
    Ok(())
}
