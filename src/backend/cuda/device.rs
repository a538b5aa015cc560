//! The one GPU libbeit uses (device 0 unless a context asks for another): a CUDA context, one stream every op is queued on, a
//! cuBLASLt handle with its workspace, and the loaded kernel modules.
//!
//! One stream means ops run in the order they are issued, so no event tracking between buffers
//! is needed (it is disabled: cudarc would otherwise record an event per buffer use). Host
//! reads (`download`) synchronise the stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;

/// Errors of driver calls, re-exported where the other CUDA files have always found them.
pub(crate) use super::errors::driver_error;
use super::nvrtc::{self, Arch};
use super::probe::{probe, GpuInfo};
use crate::error::{Error, Result};

/// cuBLASLt workspace: NVIDIA recommends 32 MiB on Hopper, 4 MiB before.
const WORKSPACE_HOPPER: usize = 32 << 20;
const WORKSPACE_OTHER: usize = 4 << 20;

/// The device this process opened, and its ordinal ([`CudaDevice::open`]). A failed open
/// claims nothing: a later request (another ordinal) tries afresh.
static OPENED: Mutex<Option<(usize, Arc<CudaDevice>)>> = Mutex::new(None);

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: GpuInfo,
    arch: Arch,
    multiprocessors: u32,
    pub(crate) blaslt: Mutex<super::blaslt::BlasLt>,
    /// Loaded modules by kernel file, and functions by (file, name).
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("gpu", &self.info).field("arch", &self.arch).finish()
    }
}

impl CudaDevice {
    /// The process-wide device: the one [`CudaDevice::open`] opened, or device 0, opened now.
    /// Fails with `Unsupported` (and the probe's reason) when CUDA is not usable here; never
    /// panics on a machine without CUDA.
    pub fn get() -> Result<Arc<CudaDevice>> {
        let opened = OPENED.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, d)| d.clone());
        match opened {
            Some(device) => Ok(device),
            None => Self::open(0),
        }
    }

    /// The process-wide device on GPU `ordinal` (as the driver counts them, after
    /// `CUDA_VISIBLE_DEVICES`), opened on the first call. libbeit drives one GPU per process
    /// (one stream, one cuBLASLt handle; data-parallel runs use one process per GPU): asking
    /// for another ordinal than the one opened is `Unsupported`, and so is an ordinal the
    /// driver does not have or a GPU older than the kernels need.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let report = probe();
        if !report.usable {
            bail!(Unsupported, "CUDA is not usable: {}", report.reason);
        }
        let count = usize::try_from(report.device_count).unwrap_or(0);
        ensure!(
            ordinal < count,
            Unsupported,
            "GPU {ordinal} was asked for, but the driver sees {count} (numbered from 0)"
        );
        let mut slot = OPENED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((open, device)) = slot.as_ref() {
            ensure!(
                *open == ordinal,
                Unsupported,
                "this process already uses GPU {open}; libbeit drives one GPU per process (run one process per \
                 GPU, or pick it with CUDA_VISIBLE_DEVICES), so GPU {ordinal} cannot be opened too"
            );
            return Ok(device.clone());
        }
        let gpu = if ordinal == 0 {
            report.gpu.clone().expect("a usable probe describes its GPU")
        } else {
            super::probe::usable_gpu(ordinal)?
        };
        let device = std::panic::catch_unwind(|| CudaDevice::create(ordinal, gpu))
            .unwrap_or_else(|_| Err(Error::Internal("creating the CUDA context panicked (see stderr)".into())))?;
        let device = Arc::new(device);
        *slot = Some((ordinal, device.clone()));
        Ok(device)
    }

    fn create(ordinal: usize, info: GpuInfo) -> Result<CudaDevice> {
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_error("context creation", e))?;
        // SAFETY: every libbeit op runs on the single stream below, in issue order, so buffers
        // need no cross-stream events; nothing else uses this context's buffers.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = info.compute_capability;
        let arch = Arch::for_compute_capability(major, minor);
        let multiprocessors = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_error("multiprocessor count query", e))? as u32;
        let workspace = if major >= 9 { WORKSPACE_HOPPER } else { WORKSPACE_OTHER };
        let blaslt = super::blaslt::BlasLt::new(&stream, workspace)?;
        Ok(CudaDevice {
            ctx,
            stream,
            info,
            arch,
            multiprocessors,
            blaslt: Mutex::new(blaslt),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every op is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The architecture kernels are compiled for (sm_90a on H100/H200).
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    pub fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }

    /// Makes the device's context current on the calling thread, leaving a pending asynchronous
    /// error pending (cudarc's `bind_to_thread` would consume and return it). For `Drop`s of
    /// types holding device buffers: cudarc frees a buffer without making its context current,
    /// so on a thread that never used CUDA the free fails with `CUDA_ERROR_INVALID_CONTEXT`, the
    /// memory leaks, and the error cudarc records fails the next CUDA call, on any thread.
    pub fn make_current(&self) {
        // SAFETY: `self.ctx` is a live context; setting it current has no other effect.
        let _ = unsafe { cudarc::driver::result::ctx::set_current(self.ctx.cu_ctx()) };
    }

    /// Waits for every queued op; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_error("stream synchronize", e))
    }

    /// The module of embedded kernel file `file` (e.g. "gelu.cu"), compiled (through the disk
    /// cache) and loaded on first use.
    pub fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(file) {
            return Ok(m.clone());
        }
        let compiled = nvrtc::compile_cached(file, &self.arch)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin))
            .map_err(|e| driver_error(&format!("loading the module of cuda/{file}"), e))?;
        modules.insert(file, module.clone());
        Ok(module)
    }

    /// Kernel `name` (an `extern "C"` entry point) of embedded file `file`.
    pub fn function(&self, file: &'static str, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|p| p.into_inner()).get(&(file, name)) {
            return Ok(f.clone());
        }
        let module = self.module(file)?;
        let f = module
            .load_function(name)
            .map_err(|e| driver_error(&format!("finding kernel {name} in cuda/{file}"), e))?;
        self.functions.lock().unwrap_or_else(|p| p.into_inner()).insert((file, name), f.clone());
        Ok(f)
    }

    /// A 1-D launch over `n` elements for a grid-stride kernel: `block` threads per block and
    /// enough blocks to fill the GPU (at most 32 per multiprocessor; fewer when `n` is small).
    pub fn launch_1d(&self, n: usize, block: u32) -> LaunchConfig {
        let wanted = n.div_ceil(block as usize).max(1);
        let cap = (self.multiprocessors.max(1) as usize) * 32;
        LaunchConfig { grid_dim: (wanted.min(cap) as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
    }

    /// Makes sure `buf` holds exactly `n` elements (launch wrappers check every argument, since
    /// a kernel cannot).
    pub(crate) fn check_len<T>(what: &str, buf: &CudaSlice<T>, n: usize) -> Result<()> {
        if buf.len() != n {
            return Err(Error::InvalidArgument(format!(
                "{what}: device buffer holds {} elements, expected {n}",
                buf.len()
            )));
        }
        Ok(())
    }
}
