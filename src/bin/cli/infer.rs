//! `beit infer`: a model directory run on the tensors of a safetensors file.

use std::path::PathBuf;

use beit::model::io::{f32_tensors_bytes, read_f32, read_mask, write_atomic, SafetensorsFile};
use beit::train::gpu_inference::GpuInference;
use beit::train::gpu_pretrain::Precision;
use beit::{Context, ContextOptions, Device, ImageBatch, Model};

#[derive(clap::Args)]
pub struct InferArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub inputs: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn infer(a: InferArgs) -> beit::Result<()> {
    let InferArgs { model, inputs, output, device, threads, json } = a;
    crate::safety::Paths::new().read("--model", &model).read("--inputs", &inputs).write("--output", &output).check()?;
    let device: Device = device.parse()?;
    let ctx = Context::new(&ContextOptions { device, threads, ..Default::default() })?;
    let model = Model::load(&model)?;
    // A cuda context runs the pass on the GPU (fp32: HF's numbers to rounding); a model the GPU
    // pass does not run (segmentation) is refused there, never computed on the CPU instead.
    let mut gpu = match ctx.device() {
        Device::Cuda => Some(GpuInference::new(&model, Precision::F32)?),
        _ => None,
    };
    let file = SafetensorsFile::open(&inputs)?;
    let st = file.parse()?;
    let (shape, pixels) = read_f32(&st, "pixel_values")?
        .ok_or_else(|| beit::Error::Format(format!("{} has no tensor pixel_values", inputs.display())))?;
    if shape.len() != 4 {
        return Err(beit::Error::InvalidArgument(format!("pixel_values must be [B,C,H,W], got shape {shape:?}")));
    }
    let mask = read_mask(&st, "bool_masked_pos")?;
    if let Some((mshape, _)) = &mask {
        if mshape.len() != 2 || mshape[0] != shape[0] {
            return Err(beit::Error::InvalidArgument(format!(
                "bool_masked_pos must be [B,N] with B = {}, got {mshape:?}",
                shape[0]
            )));
        }
    }
    let batch = ImageBatch {
        pixels: &pixels,
        batch: shape[0],
        channels: shape[1],
        height: shape[2],
        width: shape[3],
        bool_masked_pos: mask.as_ref().map(|(_, m)| &m[..]),
    };
    let start = std::time::Instant::now();
    let out = match &mut gpu {
        Some(gpu) => gpu.forward(&batch)?,
        None => ctx.run(|| model.forward(&batch))?,
    };
    let seconds = start.elapsed().as_secs_f64();
    let mut tensors: Vec<(&str, &[usize], &[f32])> =
        vec![("last_hidden_state", &out.last_hidden_state.shape, &out.last_hidden_state.data)];
    if let Some(p) = &out.pooler_output {
        tensors.push(("pooler_output", &p.shape, &p.data));
    }
    if let Some(l) = &out.logits {
        tensors.push(("logits", &l.shape, &l.data));
    }
    let bytes = f32_tensors_bytes(tensors)?;
    crate::safety::remove_stale_temp_files_of(&output)?;
    write_atomic(&output, &bytes)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "command": "infer",
                "architecture": model.architecture().hf_name(),
                "batch": shape[0],
                "device": format!("{:?}", ctx.device()).to_lowercase(),
                "threads": ctx.threads(),
                "seconds": seconds,
                "output": output.display().to_string(),
            })
        );
    }
    Ok(())
}
