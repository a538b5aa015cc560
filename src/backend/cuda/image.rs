//! The image ops of the UperNet segmentation head and the dVAE on the GPU (`cuda/image.cu`),
//! each the twin of a CPU function (named on each method) on NCHW fp32 tensors: ReLU, 2x2 max
//! pooling, bilinear resize, adaptive average pooling and batch norm, forward and backward; and
//! the segmentation head's glue: scaling, the NCHW <-> token-major transpose, the per-pixel
//! cross-entropy.
//! Convolutions are `conv.rs`, bias gradients `sums.rs`.
//!
//! Every backward is a gather (no atomics), so results are the same on every run; all but the
//! batch-norm statistics equal the CPU bit for bit (tests/cuda_image_ops.rs), the statistics to
//! f64 rounding (a block tree instead of the CPU's running sum).

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::kernel_args::{config, int, Arg};
use crate::backend::ops::DxMode;
use crate::backend::shapes::BnShape;
use crate::error::Result;

const FILE: &str = "image.cu";
const THREADS: u32 = 256;

/// Fails unless `buf` holds exactly `n` elements (a kernel cannot check its arguments).
fn expect_len(what: &str, len: usize, n: usize) -> Result<()> {
    ensure!(len == n, InvalidArgument, "{what}: the buffer holds {len} elements, the op needs {n}");
    Ok(())
}

/// `planes` planes of `hw` pixels each, as an element count (overflow-checked).
fn plane_elems(what: &str, planes: usize, hw: (usize, usize)) -> Result<usize> {
    planes
        .checked_mul(hw.0)
        .and_then(|v| v.checked_mul(hw.1))
        .ok_or_else(|| crate::error::Error::InvalidArgument(format!("{what}: {planes} planes of {hw:?} overflow")))
}

fn accumulate(mode: DxMode) -> Arg {
    Arg::I32((mode == DxMode::Accumulate) as i32)
}

impl CudaDevice {
    /// Queues a grid-stride kernel over `n` elements (one thread per element, capped grid).
    ///
    /// # Safety
    /// As [`CudaDevice::launch_kernel`]: `args` match the kernel's parameters and every pointer
    /// addresses a buffer as large as the kernel touches for `n`.
    unsafe fn launch_elements(&self, name: &'static str, n: usize, args: &[Arg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        // SAFETY: forwarded to the caller.
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(n, THREADS), args) }
    }

    /// `y = ReLU(x)` (NaN passes through), as `cpu::elementwise::relu_forward`.
    pub fn relu(&self, x: &dyn DevicePtr<f32>, y: &mut dyn DevicePtrMut<f32>) -> Result<()> {
        let n = x.len();
        expect_len("relu y", y.len(), n)?;
        let args = [Arg::Ptr(self.addr(x)), Arg::Ptr(self.addr_mut(y)), Arg::I64(n as i64)];
        // SAFETY: (const float*, float*, long long); both hold n floats.
        unsafe { self.launch_elements("beit_image_relu", n, &args) }
    }

    /// `x = ReLU(x)`, as `cpu::elementwise::relu_inplace`.
    pub fn relu_inplace(&self, x: &mut dyn DevicePtrMut<f32>) -> Result<()> {
        let n = x.len();
        let p = self.addr_mut(x);
        // SAFETY: (const float*, float*, long long); the kernel allows y to alias x.
        unsafe { self.launch_elements("beit_image_relu", n, &[Arg::Ptr(p), Arg::Ptr(p), Arg::I64(n as i64)]) }
    }

    /// `dx (=|+=) dy` where `x > 0`, else 0, as `cpu::backward::relu_backward`. `x` may be the
    /// ReLU's input or its output (both are positive at the same places).
    pub fn relu_backward(
        &self,
        x: &dyn DevicePtr<f32>,
        dy: &dyn DevicePtr<f32>,
        dx: &mut dyn DevicePtrMut<f32>,
        mode: DxMode,
    ) -> Result<()> {
        let n = x.len();
        expect_len("relu_backward dy", dy.len(), n)?;
        expect_len("relu_backward dx", dx.len(), n)?;
        let args = [
            Arg::Ptr(self.addr(x)),
            Arg::Ptr(self.addr(dy)),
            Arg::Ptr(self.addr_mut(dx)),
            Arg::I64(n as i64),
            accumulate(mode),
        ];
        // SAFETY: (const float*, const float*, float*, long long, int); all hold n floats.
        unsafe { self.launch_elements("beit_image_relu_backward", n, &args) }
    }

    /// `MaxPool2d(2)` over `planes` planes of `h x w` (floor mode), recording each output's
    /// index within its input plane in `argmax`, as `cpu::pool::max_pool2x2_forward`.
    pub fn max_pool2x2(
        &self,
        x: &dyn DevicePtr<f32>,
        y: &mut dyn DevicePtrMut<f32>,
        argmax: &mut dyn DevicePtrMut<u32>,
        planes: usize,
        (h, w): (usize, usize),
    ) -> Result<()> {
        expect_len("max_pool2x2 x", x.len(), plane_elems("max_pool2x2", planes, (h, w))?)?;
        let outputs = plane_elems("max_pool2x2", planes, (h / 2, w / 2))?;
        expect_len("max_pool2x2 y", y.len(), outputs)?;
        expect_len("max_pool2x2 argmax", argmax.len(), outputs)?;
        let args = [
            Arg::Ptr(self.addr(x)),
            Arg::Ptr(self.addr_mut(y)),
            Arg::Ptr(self.addr_mut(argmax)),
            Arg::I64(planes as i64),
            Arg::I32(int("height", h)?),
            Arg::I32(int("width", w)?),
        ];
        // SAFETY: (const float*, float*, unsigned*, long long, int, int); sizes checked above.
        unsafe { self.launch_elements("beit_image_max_pool2x2", outputs, &args) }
    }

    /// Backward of [`CudaDevice::max_pool2x2`]: each output's gradient to the element its
    /// `argmax` names, 0 elsewhere; `dx` overwritten or added to, as
    /// `cpu::pool::max_pool2x2_backward`.
    #[allow(clippy::too_many_arguments)]
    pub fn max_pool2x2_backward(
        &self,
        dy: &dyn DevicePtr<f32>,
        argmax: &dyn DevicePtr<u32>,
        dx: &mut dyn DevicePtrMut<f32>,
        planes: usize,
        (h, w): (usize, usize),
        mode: DxMode,
    ) -> Result<()> {
        let inputs = plane_elems("max_pool2x2_backward", planes, (h, w))?;
        let outputs = plane_elems("max_pool2x2_backward", planes, (h / 2, w / 2))?;
        expect_len("max_pool2x2_backward dy", dy.len(), outputs)?;
        expect_len("max_pool2x2_backward argmax", argmax.len(), outputs)?;
        expect_len("max_pool2x2_backward dx", dx.len(), inputs)?;
        let args = [
            Arg::Ptr(self.addr(dy)),
            Arg::Ptr(self.addr(argmax)),
            Arg::Ptr(self.addr_mut(dx)),
            Arg::I64(planes as i64),
            Arg::I32(int("height", h)?),
            Arg::I32(int("width", w)?),
            accumulate(mode),
        ];
        // SAFETY: (const float*, const unsigned*, float*, long long, int, int, int); checked.
        unsafe { self.launch_elements("beit_image_max_pool2x2_backward", inputs, &args) }
    }

    /// Launches a resampling kernel `name` (`(const float* src, float* dst, long long planes,
    /// int in_h, int in_w, int out_h, int out_w)`, one thread per `dst` element) of `planes`
    /// planes between `from` (the input's plane) and `to` (the output's). `backward` says the
    /// gradient runs the other way: `src` holds the output's gradient, `dst` the input's.
    #[allow(clippy::too_many_arguments)]
    fn resample(
        &self,
        name: &'static str,
        src: &dyn DevicePtr<f32>,
        dst: &mut dyn DevicePtrMut<f32>,
        planes: usize,
        from: (usize, usize),
        to: (usize, usize),
        backward: bool,
    ) -> Result<()> {
        let (input_len, output_len) = if backward { (dst.len(), src.len()) } else { (src.len(), dst.len()) };
        expect_len(&format!("{name} input"), input_len, plane_elems(name, planes, from)?)?;
        expect_len(&format!("{name} output"), output_len, plane_elems(name, planes, to)?)?;
        ensure!(
            from.0 > 0 && from.1 > 0 && to.0 > 0 && to.1 > 0,
            InvalidArgument,
            "{name}: an empty plane ({from:?} to {to:?})"
        );
        let n = dst.len();
        let args = [
            Arg::Ptr(self.addr(src)),
            Arg::Ptr(self.addr_mut(dst)),
            Arg::I64(planes as i64),
            Arg::I32(int("input height", from.0)?),
            Arg::I32(int("input width", from.1)?),
            Arg::I32(int("output height", to.0)?),
            Arg::I32(int("output width", to.1)?),
        ];
        // SAFETY: the signature above, shared by the four resampling kernels; sizes checked.
        unsafe { self.launch_elements(name, n, &args) }
    }

    /// Bilinear resize (`align_corners=False`) of `planes` planes from `from` to `to` pixels,
    /// as `cpu::interp::bilinear_forward`.
    pub fn bilinear(
        &self,
        x: &dyn DevicePtr<f32>,
        y: &mut dyn DevicePtrMut<f32>,
        planes: usize,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<()> {
        self.resample("beit_image_bilinear", x, y, planes, from, to, false)
    }

    /// Backward of [`CudaDevice::bilinear`] (`dx` `[planes, from]` overwritten), as
    /// `cpu::interp::bilinear_backward`.
    pub fn bilinear_backward(
        &self,
        dy: &dyn DevicePtr<f32>,
        dx: &mut dyn DevicePtrMut<f32>,
        planes: usize,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<()> {
        self.resample("beit_image_bilinear_backward", dy, dx, planes, from, to, true)
    }

    /// `AdaptiveAvgPool2d(to)` of `planes` planes of `from` pixels, as
    /// `cpu::interp::adaptive_avg_pool_forward`.
    pub fn adaptive_avg_pool(
        &self,
        x: &dyn DevicePtr<f32>,
        y: &mut dyn DevicePtrMut<f32>,
        planes: usize,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<()> {
        self.resample("beit_image_adaptive_avg_pool", x, y, planes, from, to, false)
    }

    /// Backward of [`CudaDevice::adaptive_avg_pool`] (`dx` overwritten), as
    /// `cpu::interp::adaptive_avg_pool_backward`. Each input element visits every output, so
    /// this is for the small pooled grids of a pyramid pooling module.
    pub fn adaptive_avg_pool_backward(
        &self,
        dy: &dyn DevicePtr<f32>,
        dx: &mut dyn DevicePtrMut<f32>,
        planes: usize,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<()> {
        self.resample("beit_image_adaptive_avg_pool_backward", dy, dx, planes, from, to, true)
    }

    /// Checks a batch norm's tensor and per-channel buffers; returns the element count.
    fn bn_check(what: &str, shape: BnShape, tensors: &[usize], channel_bufs: &[usize]) -> Result<usize> {
        let n = plane_elems(what, shape.batch, (shape.channels, shape.plane))?;
        for &len in tensors {
            expect_len(what, len, n)?;
        }
        for &len in channel_bufs {
            expect_len(&format!("{what} per-channel buffer"), len, shape.channels)?;
        }
        Ok(n)
    }

    fn bn_dims(shape: BnShape) -> Result<[Arg; 3]> {
        Ok([
            Arg::I32(int("batch", shape.batch)?),
            Arg::I32(int("channels", shape.channels)?),
            Arg::I32(int("plane", shape.plane)?),
        ])
    }

    /// The batch's per-channel mean, `1/sqrt(biased variance + eps)` and unbiased variance, as
    /// `cpu::batchnorm::batchnorm_train_forward` computes them. Needs more than one value per
    /// channel.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_stats(
        &self,
        x: &dyn DevicePtr<f32>,
        shape: BnShape,
        eps: f32,
        mean: &mut dyn DevicePtrMut<f32>,
        invstd: &mut dyn DevicePtrMut<f32>,
        var_unbiased: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        Self::bn_check("batch_norm_stats", shape, &[x.len()], &[mean.len(), invstd.len(), var_unbiased.len()])?;
        ensure!(
            shape.batch * shape.plane > 1,
            InvalidArgument,
            "batch_norm_stats: expected more than 1 value per channel when training"
        );
        let [b, c, p] = Self::bn_dims(shape)?;
        let args = [
            Arg::Ptr(self.addr(x)),
            Arg::Ptr(self.addr_mut(mean)),
            Arg::Ptr(self.addr_mut(invstd)),
            Arg::Ptr(self.addr_mut(var_unbiased)),
            b,
            c,
            p,
            Arg::F32(eps),
        ];
        // SAFETY: (const float*, float*, float*, float*, int, int, int, float); one block per
        // channel of a multiple of 32 threads, as the kernel's block sums need.
        unsafe {
            self.launch_kernel(FILE, "beit_image_batch_norm_stats", config((shape.channels, 1, 1), THREADS), &args)
        }
    }

    /// `y = (x − mean)·invstd·γ + β` per channel. `stats` says where mean and 1/std come from: the
    /// batch's ([`CudaDevice::batch_norm_stats`], training) or the running statistics
    /// (evaluation, `1/sqrt(running_var + eps)`), as `cpu::batchnorm::batchnorm_{train_forward,eval}`.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_apply(
        &self,
        x: &dyn DevicePtr<f32>,
        y: &mut dyn DevicePtrMut<f32>,
        gamma: &dyn DevicePtr<f32>,
        beta: &dyn DevicePtr<f32>,
        stats: BnStats<'_>,
        shape: BnShape,
        eps: f32,
    ) -> Result<()> {
        let (mean, stat, running) = match stats {
            BnStats::Batch { mean, invstd } => (mean, invstd, 0),
            BnStats::Running { mean, var } => (mean, var, 1),
        };
        let n = Self::bn_check(
            "batch_norm_apply",
            shape,
            &[x.len(), y.len()],
            &[gamma.len(), beta.len(), mean.len(), stat.len()],
        )?;
        let args = [
            Arg::Ptr(self.addr(x)),
            Arg::Ptr(self.addr_mut(y)),
            Arg::Ptr(self.addr(gamma)),
            Arg::Ptr(self.addr(beta)),
            Arg::Ptr(self.addr(mean)),
            Arg::Ptr(self.addr(stat)),
            Arg::I64(shape.batch as i64),
            Arg::I32(int("channels", shape.channels)?),
            Arg::I32(int("plane", shape.plane)?),
            Arg::I32(running),
            Arg::F32(eps),
        ];
        // SAFETY: (const float* x4 after y, long long, int, int, int, float) as declared; sizes
        // checked above.
        unsafe { self.launch_elements("beit_image_batch_norm_apply", n, &args) }
    }

    /// Backward of the training normalisation: `dβ += Σdy`, `dγ += Σdy·x̂` per channel and
    /// `dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))` (overwritten), as
    /// `cpu::batchnorm::batchnorm_train_backward`. `sums` is scratch of 2·channels f64.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm_backward(
        &self,
        x: &dyn DevicePtr<f32>,
        dy: &dyn DevicePtr<f32>,
        gamma: &dyn DevicePtr<f32>,
        mean: &dyn DevicePtr<f32>,
        invstd: &dyn DevicePtr<f32>,
        shape: BnShape,
        sums: &mut dyn DevicePtrMut<f64>,
        dx: &mut dyn DevicePtrMut<f32>,
        dgamma: &mut dyn DevicePtrMut<f32>,
        dbeta: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = Self::bn_check(
            "batch_norm_backward",
            shape,
            &[x.len(), dy.len(), dx.len()],
            &[gamma.len(), mean.len(), invstd.len(), dgamma.len(), dbeta.len()],
        )?;
        expect_len("batch_norm_backward sums", sums.len(), 2 * shape.channels)?;
        let [b, c, p] = Self::bn_dims(shape)?;
        let (xp, dyp, meanp, invp, sumsp) =
            (self.addr(x), self.addr(dy), self.addr(mean), self.addr(invstd), self.addr_mut(sums));
        let args = [
            Arg::Ptr(xp),
            Arg::Ptr(dyp),
            Arg::Ptr(meanp),
            Arg::Ptr(invp),
            Arg::Ptr(sumsp),
            Arg::Ptr(self.addr_mut(dgamma)),
            Arg::Ptr(self.addr_mut(dbeta)),
            b,
            c,
            p,
        ];
        let cfg = config((shape.channels, 1, 1), THREADS);
        // SAFETY: (const float* x4, double*, float*, float*, int, int, int); one block per
        // channel of a multiple of 32 threads.
        unsafe { self.launch_kernel(FILE, "beit_image_batch_norm_backward_sums", cfg, &args)? };
        let args = [
            Arg::Ptr(xp),
            Arg::Ptr(dyp),
            Arg::Ptr(self.addr(gamma)),
            Arg::Ptr(meanp),
            Arg::Ptr(invp),
            Arg::Ptr(sumsp),
            Arg::Ptr(self.addr_mut(dx)),
            Arg::I64(shape.batch as i64),
            Arg::I32(int("channels", shape.channels)?),
            Arg::I32(int("plane", shape.plane)?),
        ];
        // SAFETY: (const float* x5, const double*, float*, long long, int, int); checked above.
        unsafe { self.launch_elements("beit_image_batch_norm_backward_dx", n, &args) }
    }

    /// PyTorch's running update `r = (1 − momentum)·r + momentum·batch` of the mean and the
    /// unbiased variance, as `cpu::batchnorm::update_running_stats`.
    pub fn batch_norm_running_update(
        &self,
        running_mean: &mut dyn DevicePtrMut<f32>,
        running_var: &mut dyn DevicePtrMut<f32>,
        mean: &dyn DevicePtr<f32>,
        var_unbiased: &dyn DevicePtr<f32>,
        momentum: f32,
    ) -> Result<()> {
        let c = running_mean.len();
        for (what, len) in [("running_var", running_var.len()), ("mean", mean.len()), ("var", var_unbiased.len())] {
            expect_len(&format!("batch_norm_running_update {what}"), len, c)?;
        }
        let args = [
            Arg::Ptr(self.addr_mut(running_mean)),
            Arg::Ptr(self.addr_mut(running_var)),
            Arg::Ptr(self.addr(mean)),
            Arg::Ptr(self.addr(var_unbiased)),
            Arg::I32(int("channels", c)?),
            Arg::F32(momentum),
        ];
        // SAFETY: (float*, float*, const float*, const float*, int, float); c floats each.
        unsafe {
            self.launch_kernel(
                FILE,
                "beit_image_batch_norm_running_update",
                config((c.div_ceil(128), 1, 1), 128),
                &args,
            )
        }
    }
}

impl CudaDevice {
    /// `v *= factor`.
    pub fn scale(&self, v: &mut dyn DevicePtrMut<f32>, factor: f32) -> Result<()> {
        let n = v.len();
        let args = [Arg::Ptr(self.addr_mut(v)), Arg::F32(factor), Arg::I64(n as i64)];
        // SAFETY: (float*, float, long long); v holds n floats.
        unsafe { self.launch_elements("beit_image_scale", n, &args) }
    }

    /// `batch` matrices `[rows, cols]` of `x` transposed into `y` (`[cols, rows]` each): NCHW
    /// feature maps to token-major rows and back.
    pub fn transpose(
        &self,
        x: &dyn DevicePtr<f32>,
        y: &mut dyn DevicePtrMut<f32>,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = plane_elems("transpose", batch, (rows, cols))?;
        expect_len("transpose x", x.len(), n)?;
        expect_len("transpose y", y.len(), n)?;
        let args = [
            Arg::Ptr(self.addr(x)),
            Arg::Ptr(self.addr_mut(y)),
            Arg::I64(batch as i64),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("cols", cols)?),
        ];
        // SAFETY: (const float*, float*, long long, int, int); both hold n floats.
        unsafe { self.launch_elements("beit_image_transpose", n, &args) }
    }

    /// Per-pixel softmax cross-entropy of NCHW `logits` (`[batch, classes, plane]`) against
    /// `labels` (`[batch, plane]`, a label of `classes` leaves its pixel out): each image's sum
    /// of losses into `image_loss[image]`, and `logits` overwritten by `scale ·` d(sum)/d(logits)
    /// (0 at pixels left out), as `model::segmentation::loss::pixel_cross_entropy_sum`. Labels
    /// must be below `classes` or equal to it (the caller checks them once, on the host).
    pub fn pixel_cross_entropy(
        &self,
        logits: &mut dyn DevicePtrMut<f32>,
        labels: &dyn DevicePtr<i32>,
        image_loss: &mut dyn DevicePtrMut<f64>,
        classes: usize,
        plane: usize,
        scale: f32,
    ) -> Result<()> {
        let batch = image_loss.len();
        expect_len("pixel_cross_entropy labels", labels.len(), plane_elems("pixel_cross_entropy", batch, (1, plane))?)?;
        expect_len(
            "pixel_cross_entropy logits",
            logits.len(),
            plane_elems("pixel_cross_entropy", batch, (classes, plane))?,
        )?;
        let args = [
            Arg::Ptr(self.addr_mut(logits)),
            Arg::Ptr(self.addr(labels)),
            Arg::Ptr(self.addr_mut(image_loss)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("classes", classes)?),
            Arg::I32(int("plane", plane)?),
            Arg::F32(scale),
        ];
        // SAFETY: (float*, const int*, double*, int, int, int, float); sizes checked; one block
        // per image of a multiple of 32 threads (the block sum).
        unsafe {
            self.launch_kernel(
                FILE,
                "beit_image_pixel_cross_entropy",
                config((batch.min(65_535), 1, 1), THREADS),
                &args,
            )
        }
    }

    /// `acc[0] += Σ parts` in order (a batch's per-image loss sums into a pass's loss).
    pub fn add_sum_f64(&self, acc: &mut dyn DevicePtrMut<f64>, parts: &dyn DevicePtr<f64>) -> Result<()> {
        ensure!(acc.len() > 0, InvalidArgument, "add_sum_f64: an empty accumulator");
        let args = [Arg::Ptr(self.addr_mut(acc)), Arg::Ptr(self.addr(parts)), Arg::I32(int("parts", parts.len())?)];
        // SAFETY: (double*, const double*, int); one thread reads parts.len() doubles.
        unsafe { self.launch_kernel(FILE, "beit_image_add_sum_f64", config((1, 1, 1), 32), &args) }
    }
}

/// Where a batch norm's per-channel statistics come from.
pub enum BnStats<'a> {
    /// The batch's, from [`CudaDevice::batch_norm_stats`] (training).
    Batch { mean: &'a dyn DevicePtr<f32>, invstd: &'a dyn DevicePtr<f32> },
    /// The running mean and variance (evaluation).
    Running { mean: &'a dyn DevicePtr<f32>, var: &'a dyn DevicePtr<f32> },
}
