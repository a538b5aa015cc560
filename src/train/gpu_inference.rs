//! Inference on the GPU: the one inference pass (`Model::inference_pass`: embeddings, blocks,
//! final norm, pooler and heads, written once over the `Backend` trait) on the CUDA backend,
//! with the parameters uploaded once. For `BeitModel` (last hidden state, pooler output),
//! `BeitForMaskedImageModeling` and `BeitForImageClassification` (logits), and
//! `BeitForSemanticSegmentation` (the same backbone, then `Model::segmentation_inference_pass`'s
//! head on its levels, in the same device arena), at the model's configured image size (another
//! size resizes the position tables on the host from the parameters, which live on the device
//! here).
//!
//! fp32 ([`Precision::F32`]) equals the CPU's forward to rounding (tests/cuda_inference.rs,
//! tests/cuda_segmentation.rs); bf16 stores activations and working weights in bf16 (not for
//! segmentation: the head's image ops are fp32).

use std::sync::Arc;

use half::bf16;

use crate::backend::cuda::{Act, CudaBackend, CudaDevice, CudaMemory, DeviceArena, DeviceParams, Precision, Scratch};
use crate::error::Result;
use crate::model::plan::ActivationPlan;
use crate::model::segmentation::SegPlan;
use crate::model::{Architecture, ImageBatch, Model, OutputBuffers, Outputs};

/// A model's parameters on the GPU and the memory of its last pass shape.
pub struct GpuInference {
    inner: Inner,
}

enum Inner {
    F32(Runner<f32>),
    Bf16(Runner<bf16>),
}

impl std::fmt::Debug for GpuInference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let precision = match self.inner {
            Inner::F32(_) => Precision::F32,
            Inner::Bf16(_) => Precision::Bf16,
        };
        f.debug_struct("GpuInference").field("precision", &precision).finish()
    }
}

struct Runner<T: Act> {
    be: CudaBackend<T>,
    /// The model's config, layout and parameter table (its values live on the device).
    model: Model,
    params: DeviceParams<T>,
    /// The memory of the last batch size.
    pass: Option<Pass<T>>,
}

/// The planned memory of one batch size: the backbone's views, a segmentation model's head
/// views after them, and their arena.
struct Pass<T: Act> {
    batch: usize,
    plan: ActivationPlan,
    seg: Option<SegPlan>,
    arena: DeviceArena<T>,
}

/// What runs after planning, by storage type: the segmentation head needs the image ops,
/// which `CudaBackend<f32>` has and the bf16 backend has not.
trait Heads: Act {
    fn segmentation(r: &mut Runner<Self>, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()>;
}

impl Heads for f32 {
    fn segmentation(r: &mut Runner<f32>, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        let Pass { plan, seg, arena, .. } = r.pass.as_mut().expect("planned");
        let seg = seg.as_ref().expect("a segmentation model's pass plans its head");
        let mut m = CudaMemory::new(r.be.device(), arena, &r.params, None)?;
        r.model.segmentation_inference_pass(&r.be, &mut m, plan, seg, input, out)
    }
}

impl Heads for bf16 {
    fn segmentation(_: &mut Runner<bf16>, _: &ImageBatch<'_>, _: OutputBuffers<'_>) -> Result<()> {
        bail!(Unsupported, "segmentation runs on the GPU in fp32 only")
    }
}

impl<T: Act> Drop for Runner<T> {
    fn drop(&mut self) {
        // Before the buffers go: it may be dropped on a thread that never ran CUDA.
        self.be.device().make_current();
    }
}

impl GpuInference {
    /// Uploads `model`'s parameters. `Unsupported` when CUDA is not usable, for a head dim the
    /// fused attention has no kernel for (other than 32 and 64), or for a segmentation model in
    /// bf16.
    pub fn new(model: &Model, precision: Precision) -> Result<Self> {
        ensure!(
            model.architecture() != Architecture::SemanticSegmentation || precision == Precision::F32,
            Unsupported,
            "segmentation runs on the GPU in fp32 (the head's image ops have no bf16 kernels); use precision fp32"
        );
        if model.architecture() == Architecture::SemanticSegmentation {
            let (h, w) = model.config().image_size.hw();
            model.check_segmentation_grid(h, w)?;
        }
        let c = model.config();
        let heads = c.num_attention_heads;
        ensure!(
            c.hidden_size.is_multiple_of(heads) && matches!(c.hidden_size / heads, 32 | 64),
            Unsupported,
            "the GPU's fused attention has kernels for head dims 32 and 64; this model's is {}",
            c.hidden_size as f64 / heads as f64
        );
        let dev = CudaDevice::get()?;
        let inner = match precision {
            Precision::F32 => Inner::F32(Runner::new(dev, model)?),
            Precision::Bf16 => Inner::Bf16(Runner::new(dev, model)?),
        };
        Ok(GpuInference { inner })
    }

    /// [`Model::forward`] on the GPU: every output of the model's heads, in host memory.
    pub fn forward(&mut self, input: &ImageBatch<'_>) -> Result<Outputs> {
        let mut out = match &self.inner {
            Inner::F32(r) => r.model.zeroed_outputs(input)?,
            Inner::Bf16(r) => r.model.zeroed_outputs(input)?,
        };
        self.forward_into(input, out.buffers())?;
        Ok(out)
    }

    /// The forward of [`Model::forward_into`] on the GPU: the requested outputs into `out`
    /// (lengths as [`Model::output_shapes`] gives them). The images must be of the model's
    /// configured size.
    pub fn forward_into(&mut self, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        match &mut self.inner {
            Inner::F32(r) => r.forward_into(input, out),
            Inner::Bf16(r) => r.forward_into(input, out),
        }
    }

    /// [`GpuInference::new`] in fp32, the CPU's outputs to rounding: for callers above the
    /// library that name no backend type (the C API).
    pub fn fp32(model: &Model) -> Result<Self> {
        Self::new(model, Precision::F32)
    }
}

impl<T: Heads> Runner<T> {
    fn new(dev: Arc<CudaDevice>, model: &Model) -> Result<Self> {
        let params = DeviceParams::upload(&dev, &model.params().data)?;
        Ok(Runner { be: CudaBackend::new(dev), model: model.without_values(), params, pass: None })
    }

    fn forward_into(&mut self, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        let model = &self.model;
        model.check_input(input)?;
        model.check_outputs(input, &out)?;
        let c = model.config();
        let (height, width) = c.image_size.hw();
        ensure!(
            (input.height, input.width) == (height, width),
            Unsupported,
            "GPU inference runs at the configured image size {height}x{width}; this batch is {}x{}",
            input.height,
            input.width
        );
        let b = input.batch;
        let segmentation = model.architecture() == Architecture::SemanticSegmentation;
        if self.pass.as_ref().is_none_or(|p| p.batch != b) {
            self.pass = None; // free the old arena first
            let (plan, seg, planner) = model.inference_plan_with_head(&self.be, b, height, width);
            let arena = DeviceArena::new(self.be.device(), &planner, Scratch::default())?;
            self.pass = Some(Pass { batch: b, plan, seg, arena });
        }
        if segmentation {
            return T::segmentation(self, input, out);
        }
        let Pass { plan, arena, .. } = self.pass.as_mut().expect("planned above");
        let mut m = CudaMemory::new(self.be.device(), arena, &self.params, None)?;
        self.model.inference_pass(&self.be, &mut m, plan, input, out)
    }
}
