//! `beit pretrain-replay`: N AdamW steps on one fixed batch, for parity with a reference.

use std::path::PathBuf;

use beit::{Context, ContextOptions, Device, Model};

#[derive(clap::Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub batch: PathBuf,
    #[arg(long)]
    pub steps: u64,
    #[arg(long)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Which parameters decay: beit (BEiT's exclusions) or all (one torch.optim.AdamW group).
    #[arg(long, default_value = "beit")]
    pub weight_decay_on: String,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Stochastic depth rate (default 0: off).
    #[arg(long, default_value_t = 0.0)]
    pub drop_path: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn pretrain_replay(a: ReplayArgs) -> beit::Result<()> {
    use beit::data::batch::OwnedMimBatch;
    use beit::train::trainer::{Trainer, TrainerOptions, WeightDecayOn};
    let ctx = Context::new(&ContextOptions { device: Device::Cpu, threads: a.threads, ..Default::default() })?;
    let weight_decay_on = match a.weight_decay_on.as_str() {
        "beit" => WeightDecayOn::Beit,
        "all" => WeightDecayOn::All,
        other => return Err(beit::Error::InvalidArgument(format!("--weight-decay-on {other}: use beit or all"))),
    };
    crate::safety::Paths::new()
        .read("--model", &a.model)
        .read("--batch", &a.batch)
        .write_model_dir("--out", &a.out)
        .check()?;
    let model = Model::load(&a.model)?;
    let batch = OwnedMimBatch::load(&a.batch)?;
    let options = TrainerOptions {
        learning_rate: a.lr,
        warmup_steps: 0,
        total_steps: 0,
        weight_decay: a.weight_decay,
        weight_decay_on,
        beta1: a.beta1,
        beta2: a.beta2,
        eps: a.eps,
        clip_grad_norm: 0.0,
        drop_path_rate: Some(a.drop_path),
        seed: a.seed,
        ..TrainerOptions::default()
    };
    let mut trainer = Trainer::new(model, options)?;
    for _ in 0..a.steps {
        let stats = ctx.run(|| trainer.step(&batch.as_batch()))?;
        crate::output::print_json(
            serde_json::json!({"step": stats.step, "loss": stats.loss, "grad_norm": stats.grad_norm}),
        );
    }
    crate::output::save_model(trainer.model(), &a.out)
}
