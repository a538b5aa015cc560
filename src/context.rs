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

/// Where work runs. `Cuda` runs pretraining on the GPU and makes the passes that only run on
/// the CPU an `Unsupported` error (never a silent fallback); `Auto` picks the CPU, where every
/// pass runs, and says why.
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
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions { device: Device::Auto, threads: 0, memory_budget: None }
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
const CPU_ONLY_PASSES: &str = "segmentation does not run on the CUDA backend yet (pretraining, classification \
     fine-tuning, inference, tokenizer training, tokenizing and decoding tokens do, with device cuda)";

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
        // Pretraining, classification fine-tuning, inference (the CLI's and the C API's) and the
        // tokenizer's training, tokenizing and decoding run on CUDA (src/train/gpu_*.rs);
        // segmentation does not yet. So: an explicit cuda request gives a cuda context (those
        // stages run on the GPU, and what does not run there refuses it with `Unsupported`, as
        // GPU inference does a segmentation model and [`Context::require_cpu`] a CPU-only pass,
        // never computing on the CPU under a cuda label), and auto stays on the CPU, where every
        // pass runs, and says why.
        let (device, device_note) = match options.device {
            Device::Cpu => (Device::Cpu, "cpu requested".to_string()),
            Device::Auto => {
                let report = probe();
                let why = if report.usable {
                    format!("CUDA is usable ({}) but {CPU_ONLY_PASSES}", report.reason)
                } else {
                    format!("CUDA is not usable: {}", report.reason)
                };
                (Device::Cpu, format!("auto: using cpu because {why}"))
            }
            Device::Cuda => {
                let dev = CudaDevice::get()
                    .map_err(|e| Error::Unsupported(format!("device cuda requested, but {}", e.message())))?;
                (Device::Cuda, format!("cuda requested: {} ({CPU_ONLY_PASSES})", dev.info().name))
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

    /// `Unsupported` when this is a cuda context: for the passes that only run on the CPU
    /// (`what` names the pass in the message).
    pub fn require_cpu(&self, what: &str) -> Result<()> {
        ensure!(
            self.device != Device::Cuda,
            Unsupported,
            "{what} does not run on the CUDA backend yet ({CPU_ONLY_PASSES}); use device cpu or auto"
        );
        Ok(())
    }

    /// Why this device was chosen (for `auto`, why CUDA was not).
    pub fn device_note(&self) -> &str {
        &self.device_note
    }
}
