//! The execution context: which device, how many threads. Every pass runs inside the context's
//! own rayon pool, so a host's thread count setting is exact and independent of other libraries.

use std::sync::Arc;

use crate::backend::cuda::{probe, CudaDevice};
use crate::error::{Error, Result};

/// Where work runs. `Auto` picks CUDA when usable and says why not otherwise; `Cuda` without a
/// usable GPU is an error, never a silent fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(Error::InvalidArgument(format!("unknown device {other:?} (auto, cpu or cuda)"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ContextOptions {
    pub device: Device,
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions { device: Device::Auto, threads: 0 }
    }
}

pub struct Context {
    pool: rayon::ThreadPool,
    device: Device,
    device_note: String,
    /// The GPU when `device` is `Cuda` (shared by every context of the process).
    cuda: Option<Arc<CudaDevice>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.device)
            .field("threads", &self.threads())
            .field("note", &self.device_note)
            .finish()
    }
}

impl Context {
    pub fn new(options: &ContextOptions) -> Result<Self> {
        ensure!(
            options.threads <= 4096,
            InvalidArgument,
            "threads = {} is not a sensible thread count",
            options.threads
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("beit-worker-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the thread pool: {e}")))?;
        // The probe runs before any other CUDA call and never panics (src/backend/cuda/probe.rs).
        let (device, device_note, cuda) = match options.device {
            Device::Cpu => (Device::Cpu, "cpu requested".to_string(), None),
            Device::Auto => {
                let report = probe();
                if !report.usable {
                    (Device::Cpu, format!("auto: using cpu because CUDA is not usable: {}", report.reason), None)
                } else {
                    match CudaDevice::get() {
                        Ok(dev) => (Device::Cuda, format!("auto: using cuda: {}", report.reason), Some(dev)),
                        Err(e) => (Device::Cpu, format!("auto: using cpu because the CUDA device failed: {e}"), None),
                    }
                }
            }
            Device::Cuda => {
                let dev = CudaDevice::get()
                    .map_err(|e| Error::Unsupported(format!("device cuda requested, but {}", e.message())))?;
                (Device::Cuda, format!("cuda requested: {}", probe().reason), Some(dev))
            }
        };
        Ok(Context { pool, device, device_note, cuda })
    }

    /// Runs `f` on this context's thread pool.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Why this device was chosen (for `auto`, why CUDA was not).
    pub fn device_note(&self) -> &str {
        &self.device_note
    }

    /// The GPU, when this context's device is CUDA.
    pub fn cuda(&self) -> Option<&Arc<CudaDevice>> {
        self.cuda.as_ref()
    }
}
