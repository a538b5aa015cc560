//! Is CUDA usable here, and if not, why? Answered once per process, before any other CUDA call.
//!
//! cudarc loads the CUDA libraries lazily and *panics* when one is missing (or lacks a symbol),
//! so every step here first asks whether the library can be opened at all (`is_culib_present`),
//! and the whole probe runs behind `catch_unwind`: a machine without CUDA gets a reason string,
//! never a crash. The driver must be at least the CUDA version the bindings were built for
//! (13.0), because the bindings look up 13.0 entry points.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use cudarc::driver::sys as drv;

/// The CUDA API level libbeit's bindings use (cudarc feature `cuda-13000`), as the driver
/// reports versions: 1000·major + 10·minor.
pub(crate) const REQUIRED_DRIVER_API: i32 = 13000;

/// The oldest GPU generation the kernels target: Ampere (sm_80), the first with bf16 tensor cores.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Environment variable that makes the probe report CUDA unusable (any value but "" or "0"):
/// lets a GPU machine exercise the no-GPU paths, and lets a user force the CPU under `auto`.
pub const DISABLE_ENV: &str = "BEIT_DISABLE_CUDA";

/// What the probe found about device 0 (libbeit uses one GPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory: u64,
}

/// The outcome of probing: `usable` with the GPU's description, or the reason it is not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// True when the driver, NVRTC and cuBLASLt load, the driver is new enough and device 0 is
    /// a supported GPU.
    pub usable: bool,
    /// A sentence for a person: what was found, or exactly what is missing.
    pub reason: String,
    /// The driver's CUDA API version (e.g. 13000 for 13.0), 0 when no driver was loaded.
    pub driver_version: i32,
    /// CUDA devices the driver sees (0 without a driver).
    pub device_count: i32,
    /// Device 0, when there is one.
    pub gpu: Option<GpuInfo>,
    /// NVRTC's version, when the library loaded.
    pub nvrtc_version: Option<(i32, i32)>,
}

impl ProbeReport {
    fn unusable(reason: String) -> Self {
        ProbeReport { usable: false, reason, driver_version: 0, device_count: 0, gpu: None, nvrtc_version: None }
    }
}

/// The probe's report, computed on the first call and cached for the process.
pub fn probe() -> &'static ProbeReport {
    static REPORT: OnceLock<ProbeReport> = OnceLock::new();
    REPORT.get_or_init(|| {
        if let Ok(v) = std::env::var(DISABLE_ENV) {
            if !v.is_empty() && v != "0" {
                return ProbeReport::unusable(format!("CUDA disabled by {DISABLE_ENV}={v}"));
            }
        }
        match catch_unwind(AssertUnwindSafe(probe_uncached)) {
            Ok(report) => report,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                ProbeReport::unusable(format!("the CUDA libraries failed to load: {what}"))
            }
        }
    })
}

fn probe_uncached() -> ProbeReport {
    // SAFETY: only tries dlopen on the candidate names; calls nothing in the library.
    if !unsafe { drv::is_culib_present() } {
        return ProbeReport::unusable(
            "no NVIDIA driver: libcuda.so.1 could not be loaded (no GPU driver installed, or not on the \
             library path)"
                .to_string(),
        );
    }
    let mut driver_version = 0i32;
    // SAFETY: the library is present; cuDriverGetVersion only writes the int it is given.
    let status = unsafe { drv::cuDriverGetVersion(&mut driver_version) };
    if status != drv::CUresult::CUDA_SUCCESS {
        return ProbeReport::unusable(format!("the NVIDIA driver did not report its version ({status:?})"));
    }
    let mut report = ProbeReport::unusable(String::new());
    report.driver_version = driver_version;
    if driver_version < REQUIRED_DRIVER_API {
        report.reason = format!(
            "the NVIDIA driver supports CUDA {}, libbeit needs CUDA {} or newer (update the driver)",
            version_text(driver_version),
            version_text(REQUIRED_DRIVER_API)
        );
        return report;
    }
    if let Err(e) = cudarc::driver::result::init() {
        report.reason = format!("cuInit failed: {e:?} (driver {})", version_text(driver_version));
        return report;
    }
    let count = match cudarc::driver::result::device::get_count() {
        Ok(c) => c,
        Err(e) => {
            report.reason = format!("the driver could not count devices: {e:?}");
            return report;
        }
    };
    report.device_count = count;
    if count == 0 {
        report.reason = format!("the NVIDIA driver (CUDA {}) sees no CUDA device", version_text(driver_version));
        return report;
    }
    match gpu_info(0) {
        Ok(gpu) => report.gpu = Some(gpu),
        Err(e) => {
            report.reason = format!("device 0 could not be queried: {e:?}");
            return report;
        }
    }
    let gpu = report.gpu.clone().expect("set above");
    if gpu.compute_capability < MIN_COMPUTE_CAPABILITY {
        report.reason = format!(
            "{} has compute capability {}.{}; libbeit's CUDA kernels need {}.{} (Ampere) or newer",
            gpu.name,
            gpu.compute_capability.0,
            gpu.compute_capability.1,
            MIN_COMPUTE_CAPABILITY.0,
            MIN_COMPUTE_CAPABILITY.1
        );
        return report;
    }
    // SAFETY: dlopen attempts only.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        report.reason = format!(
            "{} found, but NVRTC (libnvrtc.so.13, the CUDA 13 runtime compiler) could not be loaded: install the \
             CUDA 13 toolkit or the nvidia-cuda-nvrtc wheel and put its lib directory on LD_LIBRARY_PATH",
            gpu.name
        );
        return report;
    }
    report.nvrtc_version = super::nvrtc::nvrtc_version().ok();
    if report.nvrtc_version.is_none() {
        report.reason = format!("{} found, but NVRTC did not report its version", gpu.name);
        return report;
    }
    // SAFETY: dlopen attempts only.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        report.reason = format!(
            "{} found, but cuBLASLt (libcublasLt.so.13) could not be loaded: install the CUDA 13 cuBLAS library \
             and put it on LD_LIBRARY_PATH",
            gpu.name
        );
        return report;
    }
    report.usable = true;
    report.reason = format!(
        "{} (compute capability {}.{}, {:.1} GiB), driver CUDA {}, NVRTC {}.{}",
        gpu.name,
        gpu.compute_capability.0,
        gpu.compute_capability.1,
        gpu.total_memory as f64 / (1u64 << 30) as f64,
        version_text(driver_version),
        report.nvrtc_version.unwrap().0,
        report.nvrtc_version.unwrap().1
    );
    report
}

/// GPU `ordinal`'s description, when the kernels run on it (the probe checks device 0 this
/// way; a context asking for another checks it here).
pub(crate) fn usable_gpu(ordinal: usize) -> crate::error::Result<GpuInfo> {
    let index = i32::try_from(ordinal)
        .map_err(|_| crate::error::Error::Unsupported(format!("GPU {ordinal} is not a device number")))?;
    let gpu = gpu_info(index)
        .map_err(|e| crate::error::Error::Unsupported(format!("GPU {ordinal} could not be queried: {e:?}")))?;
    if gpu.compute_capability < MIN_COMPUTE_CAPABILITY {
        return Err(crate::error::Error::Unsupported(format!(
            "GPU {ordinal}, {}, has compute capability {}.{}; libbeit's CUDA kernels need {}.{} (Ampere) or newer",
            gpu.name,
            gpu.compute_capability.0,
            gpu.compute_capability.1,
            MIN_COMPUTE_CAPABILITY.0,
            MIN_COMPUTE_CAPABILITY.1
        )));
    }
    Ok(gpu)
}

fn gpu_info(ordinal: i32) -> Result<GpuInfo, cudarc::driver::DriverError> {
    use cudarc::driver::result::device;
    let dev = device::get(ordinal)?;
    let name = device::get_name(dev)?;
    // SAFETY: `dev` is a valid device handle from cuDeviceGet.
    let (major, minor, total) = unsafe {
        (
            device::get_attribute(dev, drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            device::get_attribute(dev, drv::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            device::total_mem(dev)?,
        )
    };
    Ok(GpuInfo { name, compute_capability: (major, minor), total_memory: total as u64 })
}

/// 13000 -> "13.0", 12080 -> "12.8".
pub fn version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_text_is_major_dot_minor() {
        assert_eq!(version_text(13000), "13.0");
        assert_eq!(version_text(12080), "12.8");
        assert_eq!(version_text(11040), "11.4");
    }
}
