//! `beit create`: a randomly initialised model saved as an HF directory.

use std::path::PathBuf;

use beit::train::recipes::presets;
use beit::Model;

#[derive(clap::Args)]
pub struct CreateArgs {
    /// A config.json to start from, or a built-in preset name (base, tiny32).
    #[arg(long, default_value = "tiny32")]
    pub config: String,
    /// BeitModel, BeitForMaskedImageModeling or BeitForImageClassification (default: the
    /// config's `architectures`, else the preset's).
    #[arg(long)]
    pub architecture: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn create(a: CreateArgs) -> beit::Result<()> {
    let CreateArgs { config, architecture, seed, out } = a;
    crate::safety::Paths::new().read_config("--config", &config).write_model_dir("--out", &out).check()?;
    let (cfg, default_arch) = presets::config_and_architecture(&config)?;
    let arch = match architecture {
        Some(name) => beit::Architecture::from_hf_name(&name)?,
        None => default_arch,
    };
    let model = Model::new_random(cfg, arch, seed)?;
    crate::output::save_model(&model, &out)?;
    println!("created {} with {} parameters in {}", arch.hf_name(), model.params().count(), out.display());
    Ok(())
}
