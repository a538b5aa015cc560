//! The dVAE's discrete bottleneck on the GPU (`cuda/relaxation.cu`), the twin of
//! `dvae::relaxation` on token-major code logits `[rows, vocab]`: the Gumbel-softmax relaxation
//! (the same ChaCha8 noise words as the CPU) and its backward, the KL divergence to the uniform
//! prior with its gradient, and the argmax that tokenizes. One block per row; no atomics.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::kernel_args::{config, int, Arg};
use crate::error::Result;

const FILE: &str = "relaxation.cu";
const THREADS: u32 = 256;
/// Rows per launch at most (the kernels loop over rows with a grid stride).
const MAX_BLOCKS: usize = 65_535;

/// The row count of `len` logits in rows of `vocab`, checked.
fn rows_of(what: &str, len: usize, vocab: usize) -> Result<usize> {
    ensure!(vocab > 0 && len.is_multiple_of(vocab), InvalidArgument, "{what}: {len} logits are not rows of {vocab}");
    Ok(len / vocab)
}

impl CudaDevice {
    fn launch_rows(&self, name: &'static str, rows: usize, args: &[Arg]) -> Result<()> {
        // SAFETY: the callers pass each kernel's arguments in its declared order and types, with
        // buffers of rows·vocab elements (checked); one block per row of THREADS threads (a
        // multiple of 32, as the block sums need).
        unsafe { self.launch_kernel(FILE, name, config((rows.min(MAX_BLOCKS), 1, 1), THREADS), args) }
    }

    /// `y = softmax((logits + g) / tau)` row by row, with `g = −ln(−ln u)` from the ChaCha8
    /// stream of (`seed`, `step`, row), as `dvae::relaxation::gumbel_softmax`.
    pub fn gumbel_softmax(
        &self,
        logits: &dyn DevicePtr<f32>,
        y: &mut dyn DevicePtrMut<f32>,
        vocab: usize,
        tau: f32,
        seed: u64,
        step: u64,
    ) -> Result<()> {
        let rows = rows_of("gumbel_softmax", logits.len(), vocab)?;
        ensure!(y.len() == logits.len(), InvalidArgument, "gumbel_softmax: y holds {}, not {}", y.len(), logits.len());
        if tau.is_nan() || tau <= 0.0 {
            bail!(InvalidArgument, "gumbel_softmax: the temperature must be positive, not {tau}");
        }
        let args = [
            Arg::Ptr(self.addr(logits)),
            Arg::Ptr(self.addr_mut(y)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("vocab", vocab)?),
            Arg::F32(tau),
            // unsigned long long, bit for bit.
            Arg::I64(seed as i64),
            Arg::I64(step as i64),
        ];
        self.launch_rows("beit_relax_gumbel_softmax", rows, &args)
    }

    /// Backward of [`CudaDevice::gumbel_softmax`] from its output `y`:
    /// `dlogits = (1/τ)·y ⊙ (dy − Σ y·dy)` (overwritten), as
    /// `dvae::relaxation::gumbel_softmax_backward`.
    pub fn gumbel_softmax_backward(
        &self,
        y: &dyn DevicePtr<f32>,
        dy: &dyn DevicePtr<f32>,
        dlogits: &mut dyn DevicePtrMut<f32>,
        vocab: usize,
        tau: f32,
    ) -> Result<()> {
        let rows = rows_of("gumbel_softmax_backward", y.len(), vocab)?;
        ensure!(
            dy.len() == y.len() && dlogits.len() == y.len(),
            InvalidArgument,
            "gumbel_softmax_backward: y, dy and dlogits hold {}, {} and {}",
            y.len(),
            dy.len(),
            dlogits.len()
        );
        let args = [
            Arg::Ptr(self.addr(y)),
            Arg::Ptr(self.addr(dy)),
            Arg::Ptr(self.addr_mut(dlogits)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("vocab", vocab)?),
            Arg::F32(tau),
        ];
        self.launch_rows("beit_relax_gumbel_softmax_backward", rows, &args)
    }

    /// Queues `neg_entropy[r] = Σ q ln q` of each row's `q = softmax(logits)` and, with
    /// `dlogits`, adds `weight_per_row · q ⊙ (ln q − Σ q ln q)` to it. The mean KL to the
    /// uniform prior is then `Σ_r neg_entropy[r] / rows + ln V` ([`kl_from_neg_entropy`]), as
    /// `dvae::relaxation::kl_to_uniform` (whose `weight` is `weight_per_row · rows`).
    pub fn kl_to_uniform_rows(
        &self,
        logits: &dyn DevicePtr<f32>,
        dlogits: Option<&mut dyn DevicePtrMut<f32>>,
        neg_entropy: &mut dyn DevicePtrMut<f64>,
        vocab: usize,
        weight_per_row: f32,
    ) -> Result<()> {
        let rows = rows_of("kl_to_uniform", logits.len(), vocab)?;
        ensure!(
            neg_entropy.len() == rows,
            InvalidArgument,
            "kl_to_uniform: {} per-row outputs for {rows} rows",
            neg_entropy.len()
        );
        let d = match dlogits {
            Some(d) => {
                ensure!(d.len() == logits.len(), InvalidArgument, "kl_to_uniform: dlogits holds {}", d.len());
                self.addr_mut(d)
            }
            None => 0,
        };
        let args = [
            Arg::Ptr(self.addr(logits)),
            Arg::Ptr(d),
            Arg::Ptr(self.addr_mut(neg_entropy)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("vocab", vocab)?),
            Arg::F32(weight_per_row),
        ];
        self.launch_rows("beit_relax_kl_to_uniform", rows, &args)
    }

    /// The index of each row's largest logit (the first on ties), as
    /// `dvae::relaxation::argmax_rows`.
    pub fn argmax_rows(
        &self,
        logits: &dyn DevicePtr<f32>,
        tokens: &mut dyn DevicePtrMut<u32>,
        vocab: usize,
    ) -> Result<()> {
        let rows = rows_of("argmax_rows", logits.len(), vocab)?;
        ensure!(tokens.len() == rows, InvalidArgument, "argmax_rows: {} tokens for {rows} rows", tokens.len());
        let args = [
            Arg::Ptr(self.addr(logits)),
            Arg::Ptr(self.addr_mut(tokens)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("vocab", vocab)?),
        ];
        self.launch_rows("beit_relax_argmax_rows", rows, &args)
    }
}

/// The mean KL to the uniform prior from the per-row `Σ q ln q` of
/// [`CudaDevice::kl_to_uniform_rows`], summed in row order as the CPU does.
pub fn kl_from_neg_entropy(neg_entropy: &[f64], vocab: usize) -> f64 {
    neg_entropy.iter().sum::<f64>() / neg_entropy.len().max(1) as f64 + (vocab as f64).ln()
}
