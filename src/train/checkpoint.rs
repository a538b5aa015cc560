//! Trainer checkpoints: one safetensors file holding everything a run needs to continue bit for
//! bit: the parameters, AdamW's two moments and step, the trainer's step, random state, data
//! position and options, and the model config.
//!
//! One file (rather than a model file plus a state file) so that a checkpoint is replaced in a
//! single atomic rename ([`write_atomic`]): a crash during a save leaves the previous checkpoint
//! whole, and there is never a model from one step beside an optimizer state from another.
//! Loading checks everything into temporary buffers first and changes the trainer only when the
//! whole file is valid and matches the trainer's config.
//!
//! Layout: tensors `model/<HF name>`, `exp_avg/<HF name>`, `exp_avg_sq/<HF name>` (f32, the
//! parameter's shape), and string metadata (see [`META_KEYS`]).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};
use crate::model::io::{tensor_to_f32, write_atomic, SafetensorsFile};
use crate::model::{Architecture, BeitConfig, Model};

use super::trainer::{RngState, Trainer, TrainerOptions};

pub const FORMAT: &str = "beit-trainer-checkpoint";
pub const VERSION: &str = "1";

/// The metadata keys a checkpoint carries.
pub const META_KEYS: [&str; 10] = [
    "format",
    "version",
    "config",
    "architecture",
    "options",
    "step",
    "optimizer_step",
    "data_position",
    "rng_seed",
    "rng_position",
];

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The checkpoint file's bytes for `trainer`.
fn to_bytes(trainer: &Trainer) -> Result<Vec<u8>> {
    let model = &trainer.model;
    let params = model.params();
    let opt = &trainer.optimizer;
    let rng = trainer.rng_state();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("version".to_string(), VERSION.to_string());
    meta.insert("config".to_string(), model.config().to_json_string());
    meta.insert("architecture".to_string(), model.architecture().hf_name().to_string());
    meta.insert(
        "options".to_string(),
        serde_json::to_string(&trainer.options).map_err(|e| Error::Internal(e.to_string()))?,
    );
    meta.insert("step".to_string(), trainer.step.to_string());
    meta.insert("optimizer_step".to_string(), opt.step.to_string());
    meta.insert("data_position".to_string(), trainer.data_position.to_string());
    meta.insert("rng_seed".to_string(), hex(&rng.seed));
    meta.insert("rng_position".to_string(), format!("{}:{}", rng.stream, rng.word_pos));

    let specs: Vec<_> = params.specs.iter().filter(|s| s.exported).collect();
    let as_bytes = |buf: &[f32], offset: usize, len: usize| -> Vec<u8> {
        buf[offset..offset + len].iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(specs.len() * 3);
    for (prefix, buf) in [("model", &params.data), ("exp_avg", &opt.exp_avg), ("exp_avg_sq", &opt.exp_avg_sq)] {
        for s in &specs {
            owned.push((format!("{prefix}/{}", s.name), s.shape.clone(), as_bytes(buf, s.offset, s.len)));
        }
    }
    let views = owned
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| Error::Internal(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Internal(e.to_string()))
}

/// Writes `trainer`'s checkpoint to `path` atomically (temporary file, fsync, rename).
pub fn save(trainer: &Trainer, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        ensure!(
            dir.is_dir(),
            Io,
            "cannot save checkpoint {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    write_atomic(path, &to_bytes(trainer)?)
}

/// Everything read from a checkpoint, validated, not yet applied.
struct Loaded {
    config: BeitConfig,
    options: TrainerOptions,
    params: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    step: u64,
    optimizer_step: u64,
    data_position: u64,
    rng: RngState,
}

/// Opens a checkpoint and reads its format, version, architecture and config.
fn read(path: &Path) -> Result<(BeitConfig, SafetensorsFile, HashMap<String, String>)> {
    let file = SafetensorsFile::open(path)?;
    let meta = file.metadata()?;
    let get = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            Error::Format(format!("{} is not a libbeit trainer checkpoint (no {k:?} in its metadata)", path.display()))
        })
    };
    ensure!(get("format")? == FORMAT, Format, "{} is not a libbeit trainer checkpoint", path.display());
    let version = get("version")?;
    ensure!(
        version == VERSION,
        Format,
        "{}: checkpoint version {version}; this libbeit reads {VERSION}",
        path.display()
    );
    let arch = get("architecture")?;
    ensure!(
        arch == Architecture::MaskedImageModeling.hf_name(),
        Format,
        "{}: a checkpoint of a {arch} trainer; this is the pretraining (BeitForMaskedImageModeling) trainer",
        path.display()
    );
    let config = BeitConfig::from_json_str(&get("config")?)?;
    Ok((config, file, meta))
}

fn parse(path: &Path, model_for_shapes: &Model) -> Result<Loaded> {
    let (config, file, meta) = read(path)?;
    let st = file.parse()?;
    let get = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| Error::Format(format!("{}: no {k:?} in metadata", path.display())))
    };
    let num = |k: &str| -> Result<u64> {
        get(k)?.parse().map_err(|_| Error::Format(format!("{}: metadata {k:?} is not a number", path.display())))
    };
    let options: TrainerOptions = serde_json::from_str(&get("options")?)
        .map_err(|e| Error::Format(format!("{}: trainer options: {e}", path.display())))?;
    let seed: [u8; 32] = unhex(&get("rng_seed")?)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| Error::Format(format!("{}: bad rng_seed", path.display())))?;
    let rng_position = get("rng_position")?;
    let (stream, word_pos) = rng_position
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u128>().ok()?)))
        .ok_or_else(|| Error::Format(format!("{}: bad rng_position {rng_position:?}", path.display())))?;

    let p = model_for_shapes.params();
    let n = p.data.len();
    let (mut params, mut exp_avg, mut exp_avg_sq) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let exported = p.specs.iter().filter(|s| s.exported).count();
    ensure!(
        st.len() == 3 * exported,
        Format,
        "{}: holds {} tensors; a checkpoint of this model has {}",
        path.display(),
        st.len(),
        3 * exported
    );
    for (prefix, buf) in [("model", &mut params), ("exp_avg", &mut exp_avg), ("exp_avg_sq", &mut exp_avg_sq)] {
        for s in p.specs.iter().filter(|s| s.exported) {
            let name = format!("{prefix}/{}", s.name);
            let view = st.tensor(&name).map_err(|_| Error::Format(format!("{}: no tensor {name}", path.display())))?;
            ensure!(
                view.shape() == s.shape.as_slice(),
                Format,
                "{}: {name} has shape {:?}; the model needs {:?}",
                path.display(),
                view.shape(),
                s.shape
            );
            ensure!(view.dtype() == Dtype::F32, Format, "{}: {name} is {:?}, not F32", path.display(), view.dtype());
            tensor_to_f32(&view, &name, &mut buf[s.offset..s.offset + s.len])?;
        }
    }
    Ok(Loaded {
        config,
        options,
        params,
        exp_avg,
        exp_avg_sq,
        step: num("step")?,
        optimizer_step: num("optimizer_step")?,
        data_position: num("data_position")?,
        rng: RngState { seed, stream, word_pos },
    })
}

/// The first config keys whose values differ (for a readable mismatch error).
fn config_differences(a: &BeitConfig, b: &BeitConfig) -> Vec<String> {
    let (va, vb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&a.to_json_string()).unwrap_or_default(),
        serde_json::from_str(&b.to_json_string()).unwrap_or_default(),
    );
    let (Some(ma), Some(mb)) = (va.as_object(), vb.as_object()) else {
        return vec!["config".into()];
    };
    let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| ma.get(*k) != mb.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
            format!("{k}: {} in the checkpoint, {} here", show(mb.get(k)), show(ma.get(k)))
        })
        .take(4)
        .collect()
}

fn apply(trainer: &mut Trainer, l: Loaded) {
    trainer.model.params_mut().data.copy_from_slice(&l.params);
    let mut opt = super::trainer::new_adamw(&trainer.model, &l.options);
    opt.exp_avg = l.exp_avg;
    opt.exp_avg_sq = l.exp_avg_sq;
    opt.step = l.optimizer_step;
    trainer.optimizer = opt;
    trainer.set_options_unchecked(l.options);
    trainer.step = l.step;
    trainer.data_position = l.data_position;
    trainer.set_rng_state(&l.rng);
}

/// Restores `trainer` from the checkpoint at `path`. The checkpoint must be of the same model
/// config; on any error the trainer is unchanged.
pub fn load_into(trainer: &mut Trainer, path: &Path) -> Result<()> {
    let (config, _, _) = read(path)?;
    let diff = config_differences(trainer.model.config(), &config);
    ensure!(
        diff.is_empty(),
        InvalidArgument,
        "checkpoint {} is of another model config ({})",
        path.display(),
        diff.join("; ")
    );
    let loaded = parse(path, &trainer.model)?;
    loaded.options.validate()?;
    apply(trainer, loaded);
    Ok(())
}

/// A trainer restored from a checkpoint alone (its config, options and state).
pub fn load(path: &Path) -> Result<Trainer> {
    let (config, _, _) = read(path)?;
    let model = Model::zeroed(config, Architecture::MaskedImageModeling)?;
    let loaded = parse(path, &model)?;
    let mut trainer = Trainer::new(model, loaded.options.clone())?;
    debug_assert_eq!(trainer.model.config().to_json_string(), loaded.config.to_json_string());
    apply(&mut trainer, loaded);
    Ok(trainer)
}
