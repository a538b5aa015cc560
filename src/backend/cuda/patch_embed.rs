//! BEiT's patch embedding on the GPU: `Conv2d(C, D, kernel = stride = patch)` followed by
//! `flatten(2).transpose(1, 2)`, as a patch rearrangement (`cuda/patch_embed.cu`) and one
//! cuBLASLt GEMM with the bias epilogue: tokens[B·N, D] = patches[B·N, C·ph·pw] · W[D, C·ph·pw]ᵀ + b.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::device::{driver_error, CudaDevice};
use super::elementwise::by_type;
use super::matmul::{Epilogue, GemmType};
use crate::backend::shapes::GemmShape;
use crate::error::Result;

pub use crate::backend::shapes::PatchEmbedShape;

impl CudaDevice {
    /// The first half alone: `patches[B·N, C·ph·pw]` (in `T`) from the fp32 `pixels`, the rows
    /// the patch GEMM reads (the pretraining step keeps them for the weight gradient).
    pub fn patchify_into<T: GemmType>(
        &self,
        shape: PatchEmbedShape,
        pixels: &dyn DevicePtr<f32>,
        patches: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let PatchEmbedShape { batch, channels, height, width, patch_h, patch_w, .. } = shape;
        ensure!(
            patch_h > 0 && patch_w > 0 && height >= patch_h && width >= patch_w && batch > 0 && channels > 0,
            InvalidArgument,
            "patchify: bad geometry {shape:?}"
        );
        ensure!(
            pixels.len() == batch * channels * height * width,
            InvalidArgument,
            "patchify: pixels hold {}, expected {batch}x{channels}x{height}x{width}",
            pixels.len()
        );
        let (gh, gw) = shape.grid();
        let total = batch * shape.num_patches() * shape.patch_len();
        ensure!(patches.len() == total, InvalidArgument, "patchify: patches hold {}, expected {total}", patches.len());
        let f = self.function("patch_embed.cu", by_type::<T>("beit_patchify_f32", "beit_patchify_bf16"))?;
        let xp = pixels.device_ptr(self.stream()).0;
        let pp = patches.device_ptr_mut(self.stream()).0;
        let dims = [channels as i32, height as i32, width as i32, patch_h as i32, patch_w as i32, gh as i32, gw as i32];
        let total_arg = total as i64;
        let mut launch = self.stream().launch_builder(&f);
        launch.arg(&xp).arg(&pp);
        for d in &dims {
            launch.arg(d);
        }
        launch.arg(&total_arg);
        // SAFETY: (const float*, T*, int x7, long long) as the kernel declares; `patches` holds
        // `total` elements and every source index is inside `pixels` (checked lengths, floor grid).
        unsafe { launch.launch(self.launch_1d(total, 256)) }.map_err(|e| driver_error("launching beit_patchify", e))?;
        Ok(())
    }

    /// `tokens[b, n, :] = W · patch(b, n) + bias`, `pixels` fp32 [B, C, H, W], `weight` the
    /// conv weight [D, C, ph, pw] and `bias` [D] in the compute type `T` (f32 for the parity
    /// mode, bf16 otherwise), `tokens` [B, N, D] in `T`.
    pub fn patch_embed<T: GemmType + cudarc::driver::ValidAsZeroBits>(
        &self,
        shape: PatchEmbedShape,
        pixels: &dyn DevicePtr<f32>,
        weight: &dyn DevicePtr<T>,
        bias: &dyn DevicePtr<T>,
        tokens: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let PatchEmbedShape { batch, channels, height, width, patch_h, patch_w, hidden } = shape;
        ensure!(
            patch_h > 0 && patch_w > 0 && height >= patch_h && width >= patch_w && batch > 0 && channels > 0,
            InvalidArgument,
            "patch_embed: bad geometry {shape:?}"
        );
        let rows = batch * shape.num_patches();
        let k = shape.patch_len();
        ensure!(
            pixels.len() == batch * channels * height * width,
            InvalidArgument,
            "patch_embed: pixels hold {}, expected {batch}x{channels}x{height}x{width}",
            pixels.len()
        );
        ensure!(
            weight.len() == hidden * k,
            InvalidArgument,
            "patch_embed: weight holds {}, expected {hidden}x{k}",
            weight.len()
        );
        ensure!(bias.len() == hidden, InvalidArgument, "patch_embed: bias holds {}, expected {hidden}", bias.len());
        ensure!(
            tokens.len() == rows * hidden,
            InvalidArgument,
            "patch_embed: tokens hold {}, expected {rows}x{hidden}",
            tokens.len()
        );
        let mut patches = self.zeros::<T>(rows * k)?;
        self.patchify_into(shape, pixels, &mut patches)?;
        self.gemm::<T, T>(GemmShape::linear(rows, k, hidden), 1.0, &patches, weight, 0.0, tokens, Epilogue::Bias(bias))
    }
}
