//! The execution context: which device, how many threads. Every pass runs inside the context's
//! own rayon pool, so a host's thread count setting is exact and independent of other libraries.

use crate::backend::cuda::{probe, CudaDevice};
use crate::error::{Error, Result};

/// Where work runs. `Auto` will pick CUDA once model passes run there (today it picks the CPU
/// and says why); `Cuda` is an error until then, never a silent fallback.
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

/// Why a usable GPU is not used yet (see [`Context::new`]).
const MODEL_PASSES_ON_CPU: &str = "model passes (inference, training) do not run on the CUDA backend yet";

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
        // The CUDA backend's ops exist and are tested on a GPU by scripts/gpu-check, but the
        // model passes (inference, pretraining, fine-tuning) do not run on it yet. A context that
        // said "cuda" would then compute on the CPU behind the user's back, so: auto picks the
        // CPU and says why, and an explicit cuda request is an error either way.
        let (device, device_note) = match options.device {
            Device::Cpu => (Device::Cpu, "cpu requested".to_string()),
            Device::Auto => {
                let report = probe();
                let why = if report.usable {
                    format!("CUDA is usable ({}) but {MODEL_PASSES_ON_CPU}", report.reason)
                } else {
                    format!("CUDA is not usable: {}", report.reason)
                };
                (Device::Cpu, format!("auto: using cpu because {why}"))
            }
            Device::Cuda => {
                CudaDevice::get()
                    .map_err(|e| Error::Unsupported(format!("device cuda requested, but {}", e.message())))?;
                bail!(
                    Unsupported,
                    "device cuda requested: the GPU is usable ({}), but {MODEL_PASSES_ON_CPU}; use device cpu or auto",
                    probe().reason
                )
            }
        };
        Ok(Context { pool, device, device_note })
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
}
