//! `ImageOps`: the ops of the convolutional networks beside the transformer, over the same
//! planned [`View`]s as [`Backend`]: the segmentation head (FPN, UperNet, FCN auxiliary head and
//! its pixel loss) and the tokenizer's encoder and decoder. Feature maps are NCHW.
//!
//! As in [`Backend`], parameter gradients are ADDED to and activation gradients written unless a
//! [`DxMode`] says otherwise; every op is deterministic for any thread count.

use super::memory::View;
use super::ops::{Backend, DxMode};
use super::shapes::{BnShape, Conv2dShape, ResizeShape};
use crate::error::Result;

/// `Stat` elements a training-mode batch norm over `channels` channels keeps
/// ([`ImageOps::batch_norm_train`]): per channel the batch mean, then 1/std (biased variance +
/// eps), then the unbiased variance (what the running average takes), as `[3, channels]`.
pub const fn batch_norm_saved_len(channels: usize) -> usize {
    3 * channels
}

/// A BatchNorm's affine parameters and, for evaluation, its running statistics.
#[derive(Debug, Clone, Copy)]
pub struct BatchNorm {
    pub gamma: View,
    pub beta: View,
    pub running_mean: View,
    pub running_var: View,
    pub eps: f32,
}

/// The image ops. A backend offers them beside [`Backend`]'s.
pub trait ImageOps: Backend {
    /// PyTorch `Conv2d` (groups 1, dilation 1): `out` `[batch, out, out_h, out_w]` from `x`
    /// `[batch, in, in_h, in_w]`, `weight` `[out, in, k, k]` and `bias` `[out]`.
    fn conv2d(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        x: View,
        weight: View,
        bias: Option<View>,
        shape: Conv2dShape,
    ) -> Result<()>;

    /// Gradients of [`ImageOps::conv2d`] for `dout`: `dx` (when wanted, per `mode`), `dweight`
    /// and `dbias` (added).
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: Option<(View, DxMode)>,
        dweight: View,
        dbias: Option<View>,
        dout: View,
        x: View,
        weight: View,
        shape: Conv2dShape,
    ) -> Result<()>;

    /// PyTorch `ConvTranspose2d` (output_padding 0): `out` `[batch, out, transpose_out_h,
    /// transpose_out_w]` from `x` `[batch, in, in_h, in_w]`, `weight` `[in, out, k, k]`.
    fn conv_transpose2d(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        x: View,
        weight: View,
        bias: Option<View>,
        shape: Conv2dShape,
    ) -> Result<()>;

    /// Gradients of [`ImageOps::conv_transpose2d`], as [`ImageOps::conv2d_backward`].
    #[allow(clippy::too_many_arguments)]
    fn conv_transpose2d_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: Option<(View, DxMode)>,
        dweight: View,
        dbias: Option<View>,
        dout: View,
        x: View,
        weight: View,
        shape: Conv2dShape,
    ) -> Result<()>;

    /// Evaluation-mode `BatchNorm2d`: `out = (x − running_mean) / sqrt(running_var + eps) · γ + β`.
    fn batch_norm_eval(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        x: View,
        bn: BatchNorm,
        shape: BnShape,
    ) -> Result<()>;

    /// Training-mode `BatchNorm2d`: normalises with the batch's per-channel statistics and keeps
    /// them in `saved` (`Stat`, [`batch_norm_saved_len`]). Needs more than one value per channel.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_train(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        saved: View,
        x: View,
        gamma: View,
        beta: View,
        eps: f32,
        shape: BnShape,
    ) -> Result<()>;

    /// Gradients of [`ImageOps::batch_norm_train`] for `dy`: `dx` written, `dgamma`, `dbeta`
    /// added.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: View,
        dgamma: View,
        dbeta: View,
        dy: View,
        x: View,
        gamma: View,
        saved: View,
        shape: BnShape,
    ) -> Result<()>;

    /// PyTorch's running update from what [`ImageOps::batch_norm_train`] kept:
    /// `r = (1 − momentum)·r + momentum·batch` for the mean and the unbiased variance.
    fn batch_norm_update_running(
        &self,
        m: &mut Self::Memory<'_>,
        running_mean: View,
        running_var: View,
        saved: View,
        momentum: f32,
    ) -> Result<()>;

    /// `out = ReLU(x)` (a NaN passes through); in place when `out == x`.
    fn relu(&self, m: &mut Self::Memory<'_>, out: View, x: View) -> Result<()>;

    /// Backward of [`ImageOps::relu`] read from its input or its output `y` (positive exactly
    /// where the input was): `dx = dout` where `y > 0`, else 0, per `mode`. `dx == dout` masks
    /// the gradient in place (`mode` Overwrite).
    fn relu_backward(&self, m: &mut Self::Memory<'_>, dx: View, dout: View, y: View, mode: DxMode) -> Result<()>;

    /// `out = GELU(x)` (exact erf GELU), element by element.
    fn gelu(&self, m: &mut Self::Memory<'_>, out: View, x: View) -> Result<()>;

    /// Backward of [`ImageOps::gelu`] from its input: `dx = dy ⊙ GELU'(x)`.
    fn gelu_input_backward(&self, m: &mut Self::Memory<'_>, dx: View, dy: View, x: View) -> Result<()>;

    /// `Stat` elements [`ImageOps::max_pool2x2`] keeps for its backward, for `out_len` outputs.
    fn max_pool2x2_saved_len(&self, out_len: usize) -> usize;

    /// PyTorch `MaxPool2d(2)` over `planes` planes of `h x w` (an odd last row or column is
    /// dropped); keeps the chosen positions in `saved`.
    #[allow(clippy::too_many_arguments)]
    fn max_pool2x2(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        saved: View,
        x: View,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()>;

    /// Backward of [`ImageOps::max_pool2x2`]: each output's gradient to the input it chose, per
    /// `mode`.
    #[allow(clippy::too_many_arguments)]
    fn max_pool2x2_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: View,
        dout: View,
        saved: View,
        planes: usize,
        h: usize,
        w: usize,
        mode: DxMode,
    ) -> Result<()>;

    /// `nn.AdaptiveAvgPool2d((out_h, out_w))`.
    fn adaptive_avg_pool(&self, m: &mut Self::Memory<'_>, out: View, x: View, shape: ResizeShape) -> Result<()>;

    /// Backward of [`ImageOps::adaptive_avg_pool`]: `dx` written.
    fn adaptive_avg_pool_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: View,
        dout: View,
        shape: ResizeShape,
    ) -> Result<()>;

    /// `F.interpolate(mode="bilinear", align_corners=False)`.
    fn bilinear_resize(&self, m: &mut Self::Memory<'_>, out: View, x: View, shape: ResizeShape) -> Result<()>;

    /// Backward of [`ImageOps::bilinear_resize`]: `dx` written.
    fn bilinear_resize_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: View,
        dout: View,
        shape: ResizeShape,
    ) -> Result<()>;

    /// `v *= factor`.
    fn scale(&self, m: &mut Self::Memory<'_>, v: View, factor: f32) -> Result<()>;

    /// `y += a · x`.
    fn add_scaled(&self, m: &mut Self::Memory<'_>, y: View, x: View, a: f32) -> Result<()>;

    /// `batch` matrices `[rows, cols]` of `x` transposed into `out` (`[cols, rows]` each): NCHW
    /// maps to token-major rows and back.
    fn transpose(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        x: View,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()>;

    /// Per-pixel softmax cross-entropy of NCHW `logits` (`[batch, classes, plane]`) against
    /// `labels` (`Index`, `[batch, plane]`; a label of `classes` marks a pixel left out): the
    /// sum of the losses is added to the memory's loss ([`Backend::take_loss`]) and `logits` is
    /// overwritten by `scale ·` d(sum)/d(logits) (0 at pixels left out).
    fn pixel_cross_entropy(
        &self,
        m: &mut Self::Memory<'_>,
        logits: View,
        labels: View,
        classes: usize,
        plane: usize,
        scale: f32,
    ) -> Result<()>;
}
