//! The execution context: which device, how many threads, how much memory one object may need.
//! Every pass runs inside the context's own rayon pool, so a host's thread count setting is exact
//! and independent of other libraries, and under the context's memory budget
//! ([`crate::resources`]).

use crate::backend::cuda::{probe, CudaDevice};
use crate::error::{Error, Result};
use crate::resources::{self, MemoryBudget};

/// What the CUDA probe found on this machine: whether CUDA is usable, and if not, why (the
/// probe never panics and runs before any other CUDA call). Hosts read the device through the
/// context's API; only the context and the backends look inside `backend::cuda`.
pub use crate::backend::cuda::probe::{GpuInfo, ProbeReport};

/// Probes CUDA (cached after the first call): what `Device::Auto` decides from.
pub fn probe_cuda() -> &'static ProbeReport {
    probe()
}

/// The backend of passes that run on this host's CPU: what a model's entry points without a
/// context (`Model::forward`, the CPU training passes) run their pass on. The model names no
/// backend; it asks the context.
pub fn host_backend() -> crate::backend::cpu::ops::Cpu {
    crate::backend::cpu::ops::Cpu
}

/// Where work runs. `Cuda` runs every stage on the GPU, and what the GPU cannot run (a shape or
/// option its kernels do not cover, such as the pixel MIM target) is an `Unsupported` error,
/// never a silent CPU run; `Auto` picks CUDA when the probe says it is usable and the CPU
/// otherwise, and says which and why ([`Context::device_note`]).
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
    /// How much memory one model, trainer, pass, loader or tokenizer planned on this context may
    /// need; `None` keeps the budget of the code that calls [`Context::run`] (by default the
    /// memory available to the process, [`MemoryBudget::Available`]).
    pub memory_budget: Option<MemoryBudget>,
    /// Which GPU a cuda (or auto) context uses, as the driver numbers them (after
    /// `CUDA_VISIBLE_DEVICES`). One process drives one GPU: every context of a process names
    /// the same one. Must be 0 for a cpu context.
    pub device_index: usize,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions { device: Device::Auto, threads: 0, memory_budget: None, device_index: 0 }
    }
}

pub struct Context {
    pool: rayon::ThreadPool,
    device: Device,
    device_note: String,
    memory_budget: Option<MemoryBudget>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.device)
            .field("threads", &self.threads())
            .field("note", &self.device_note)
            .field("memory_budget", &self.memory_budget)
            .finish()
    }
}

/// What still runs on the CPU only (see [`Context::new`]).
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
        // Every stage runs on CUDA (src/train/gpu_*.rs): pretraining, classification and
        // segmentation fine-tuning, inference, the tokenizer's training, tokenizing and
        // decoding. An explicit cuda request without a usable GPU is an error; auto takes the
        // GPU when the probe says it is usable and opening it works, else the CPU, and says why.
        let index = options.device_index;
        let (device, device_note) = match options.device {
            Device::Cpu => {
                ensure!(
                    index == 0,
                    InvalidArgument,
                    "device_index {index} names a GPU, but this context runs on the cpu (use device cuda or auto)"
                );
                (Device::Cpu, "cpu requested".to_string())
            }
            Device::Auto => {
                let report = probe();
                if !report.usable {
                    (Device::Cpu, format!("auto: using cpu because CUDA is not usable: {}", report.reason))
                } else {
                    match CudaDevice::open(index) {
                        Ok(dev) => (
                            Device::Cuda,
                            format!("auto: using cuda, GPU {index}: {} ({})", dev.info().name, report.reason),
                        ),
                        Err(e) => (
                            Device::Cpu,
                            format!("auto: using cpu because GPU {index} could not be opened: {}", e.message()),
                        ),
                    }
                }
            }
            Device::Cuda => {
                let dev = CudaDevice::open(index)
                    .map_err(|e| Error::Unsupported(format!("device cuda requested, but {}", e.message())))?;
                (Device::Cuda, format!("cuda requested: GPU {index}, {}", dev.info().name))
            }
        };
        if let Some(MemoryBudget::Bytes(0)) = options.memory_budget {
            bail!(InvalidArgument, "a memory budget of 0 bytes admits nothing");
        }
        Ok(Context { pool, device, device_note, memory_budget: options.memory_budget })
    }

    /// Runs `f` on this context's thread pool, under its memory budget (or, without one, the
    /// budget of the calling thread).
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let budget = self.memory_budget();
        self.pool.install(move || resources::with_budget(budget, f))
    }

    /// The budget work on this context runs under (see [`ContextOptions::memory_budget`]).
    pub fn memory_budget(&self) -> MemoryBudget {
        self.memory_budget.unwrap_or_else(resources::current)
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Which device was chosen and why (for `auto`: CUDA's name, or why not CUDA).
    pub fn device_note(&self) -> &str {
        &self.device_note
    }
}
