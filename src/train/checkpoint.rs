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
//! parameter's shape), and one metadata entry, [`META_KEY`], whose value is the JSON of
//! [`CheckpointMeta`]. One entry because safetensors writes its metadata map in hash order:
//! with several keys, two saves of the same state would not be byte-identical.
//!
//! A front end may add a [`RunRecord`] (its data-affecting options: batch size, dataset, masking,
//! ...) with [`Trainer::set_run_record`]; it is saved as the metadata's optional `run` field and
//! comes back with the trainer. Without one the field is absent, so the bytes of a checkpoint
//! saved without a record (e.g. through the C API) are what they were before the field existed.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::io::{f32_tensors_bytes_with_metadata, tensor_to_f32, write_atomic, SafetensorsFile};
use crate::model::{Architecture, BeitConfig, Model};
use crate::resources::{try_zeroed, Bytes, Need};
use crate::train::gpu_pretrain::GpuPretrainer;

use super::run_record::RunRecord;
use super::trainer::{RngState, Trainer, TrainerOptions};

pub(crate) const FORMAT: &str = "beit-trainer-checkpoint";
pub(crate) const VERSION: u32 = 1;
/// The safetensors metadata key holding [`CheckpointMeta`] as JSON.
pub const META_KEY: &str = "beit_checkpoint";

/// Everything in a checkpoint besides the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    pub format: String,
    pub version: u32,
    /// The model's config.json text.
    pub config: String,
    pub architecture: String,
    pub options: TrainerOptions,
    pub step: u64,
    pub optimizer_step: u64,
    pub data_position: u64,
    /// The ChaCha8 seed, hex.
    pub rng_seed: String,
    pub rng_stream: u64,
    /// The ChaCha8 word position (a u128, as a decimal string: JSON numbers stop at 2^53).
    pub rng_word_pos: String,
    /// The front end's record of the run's data-affecting options, where it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunRecord>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The checkpoint file's bytes for `trainer`.
fn to_bytes(trainer: &Trainer) -> Result<Vec<u8>> {
    let model = &trainer.model;
    let params = model.params();
    // With the GPU step the current parameters and moments are on the device.
    let device_state = trainer.current_state()?;
    let (param_data, opt) = match &device_state {
        Some((data, opt)) => (data, opt),
        None => (&params.data, &trainer.optimizer),
    };
    let rng = trainer.rng_state();
    let meta = CheckpointMeta {
        format: FORMAT.to_string(),
        version: VERSION,
        config: model.config().to_json_string(),
        architecture: model.architecture().hf_name().to_string(),
        options: trainer.options.clone(),
        step: trainer.step,
        optimizer_step: opt.step,
        data_position: trainer.data_position,
        rng_seed: hex(&rng.seed),
        rng_stream: rng.stream,
        rng_word_pos: rng.word_pos.to_string(),
        run: trainer.run_record.clone(),
    };
    let meta_json = serde_json::to_string(&meta).map_err(|e| Error::Internal(e.to_string()))?;
    let meta = HashMap::from([(META_KEY.to_string(), meta_json)]);

    let specs: Vec<_> = params.specs.iter().filter(|s| s.exported).collect();
    let buffers = [("model", param_data), ("exp_avg", &opt.exp_avg), ("exp_avg_sq", &opt.exp_avg_sq)];
    let tensors = buffers.iter().flat_map(|&(prefix, buf)| {
        specs
            .iter()
            .map(move |s| (format!("{prefix}/{}", s.name), s.shape.as_slice(), &buf[s.offset..s.offset + s.len]))
    });
    f32_tensors_bytes_with_metadata(tensors, meta)
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
    run: Option<RunRecord>,
}

/// Opens a checkpoint and reads and checks its metadata, config and architecture.
fn read(path: &Path) -> Result<(BeitConfig, Architecture, SafetensorsFile, CheckpointMeta)> {
    let file = SafetensorsFile::open(path)?;
    let Some(text) = file.metadata()?.remove(META_KEY) else {
        bail!(Format, "{} is not a libbeit trainer checkpoint (no {META_KEY:?} metadata)", path.display());
    };
    let meta: CheckpointMeta = serde_json::from_str(&text)
        .map_err(|e| Error::Format(format!("{}: checkpoint metadata: {e}", path.display())))?;
    ensure!(meta.format == FORMAT, Format, "{} is not a libbeit trainer checkpoint", path.display());
    ensure!(
        meta.version == VERSION,
        Format,
        "{}: checkpoint version {}; this libbeit reads {VERSION}",
        path.display(),
        meta.version
    );
    // Trainers exist for pretraining, and classification and segmentation fine-tuning.
    let arch = match Architecture::from_hf_name(&meta.architecture) {
        Ok(
            a @ (Architecture::MaskedImageModeling
            | Architecture::ImageClassification
            | Architecture::SemanticSegmentation),
        ) => a,
        _ => {
            bail!(Format, "{}: a checkpoint of a {} trainer, which libbeit has not", path.display(), meta.architecture)
        }
    };
    let mut config = BeitConfig::from_json_str(&meta.config)?;
    // The metadata's architecture is the checkpoint's class; a model names its class in
    // `architectures` (Model::new sets it), so a config that left it out or says otherwise
    // would differ from the trainer it restores (found by the safetensors_header fuzz target:
    // a checkpoint whose config lost "architectures" was refused by `load_into`).
    config.architectures = Some(vec![arch.hf_name().to_string()]);
    Ok((config, arch, file, meta))
}

fn parse(path: &Path, model_for_shapes: &Model) -> Result<Loaded> {
    let (config, _, file, meta) = read(path)?;
    let st = file.parse()?;
    let bad = |what: &str| Error::Format(format!("{}: bad {what} in the checkpoint metadata", path.display()));
    let seed: [u8; 32] = unhex(&meta.rng_seed).and_then(|v| v.try_into().ok()).ok_or_else(|| bad("rng_seed"))?;
    let word_pos: u128 = meta.rng_word_pos.parse().map_err(|_| bad("rng_word_pos"))?;

    let p = model_for_shapes.params();
    let n = p.data.len();
    // The three buffers are read in full before anything is applied (a bad file changes
    // nothing), so they are tested against the budget first.
    Need::new(format!("reading the checkpoint's 3 buffers of {n} values"), Bytes::floats(&[3, n])).check_config()?;
    let what = "a checkpoint buffer";
    let (mut params, mut exp_avg, mut exp_avg_sq) = (try_zeroed(n, what)?, try_zeroed(n, what)?, try_zeroed(n, what)?);
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
            let values = &mut buf[s.offset..s.offset + s.len];
            tensor_to_f32(&view, &name, values)?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                bail!(
                    Format,
                    "{}: {name} holds {} at index {i}: a checkpoint must be finite",
                    path.display(),
                    values[i]
                );
            }
        }
    }
    Ok(Loaded {
        config,
        options: meta.options,
        params,
        exp_avg,
        exp_avg_sq,
        step: meta.step,
        optimizer_step: meta.optimizer_step,
        data_position: meta.data_position,
        rng: RngState { seed, stream: meta.rng_stream, word_pos },
        run: meta.run,
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

/// Moves a parsed checkpoint into `trainer`; fails (leaving it unchanged) only before the first
/// change, when the optimizer state cannot be allocated.
fn apply(trainer: &mut Trainer, l: Loaded) -> Result<()> {
    let mut opt = super::trainer::new_adamw(&trainer.model, &l.options)?;
    trainer.model.params_mut().data.copy_from_slice(&l.params);
    opt.exp_avg = l.exp_avg;
    opt.exp_avg_sq = l.exp_avg_sq;
    opt.step = l.optimizer_step;
    trainer.optimizer = opt;
    trainer.set_options_unchecked(l.options);
    trainer.step = l.step;
    trainer.data_position = l.data_position;
    trainer.set_rng_state(&l.rng);
    trainer.run_record = l.run;
    Ok(())
}

// The trainer's checkpoint methods live here, beside the format, so that the trainer itself
// does not import this module (checkpoint -> trainer only; no cycle).
impl Trainer {
    /// Writes a checkpoint of everything this trainer holds to `path`, atomically: a crash or
    /// error during the save leaves any previous file at `path` intact. Refused while a step
    /// is pending (its random state and gradients are half a step on).
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        self.check_nothing_pending("save_checkpoint")?;
        save(self, path)
    }

    /// Restores this trainer from a checkpoint of the same model config. On error (unreadable
    /// file, another config, corrupt tensors, a step pending) the trainer is unchanged.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        self.check_nothing_pending("load_checkpoint")?;
        load_into(self, path)
    }

    /// A trainer restored from a checkpoint alone.
    pub fn from_checkpoint(path: &Path) -> Result<Self> {
        load(path)
    }

    /// Sets the record of this run's data-affecting options that checkpoints carry (`None`:
    /// none, the checkpoint's metadata then has no `run` field).
    pub fn set_run_record(&mut self, record: Option<RunRecord>) {
        self.run_record = record;
    }

    /// The record set with [`Trainer::set_run_record`], or restored from a checkpoint; `None`
    /// for a checkpoint written without one (by an older libbeit, or through the C API).
    pub fn run_record(&self) -> Option<&RunRecord> {
        self.run_record.as_ref()
    }
}

/// Restores `trainer` from the checkpoint at `path`. The checkpoint must be of the same model
/// config; on any error the trainer is unchanged.
pub fn load_into(trainer: &mut Trainer, path: &Path) -> Result<()> {
    let (config, arch, _, _) = read(path)?;
    ensure!(
        arch == trainer.model.architecture(),
        InvalidArgument,
        "checkpoint {} is of a {} trainer; this trainer trains a {}",
        path.display(),
        arch.hf_name(),
        trainer.model.architecture().hf_name()
    );
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
    if arch == Architecture::MaskedImageModeling {
        // The checkpoint's MIM target comes with it; the head and the step's device must fit it.
        loaded.options.mim_target.check_config(&config)?;
        if trainer.cuda_precision().is_some() {
            GpuPretrainer::check_target(loaded.options.mim_target)?;
        }
    }
    apply(trainer, loaded)?;
    trainer.reload_gpu()
}

/// A trainer restored from a checkpoint alone (its config, options and state).
pub fn load(path: &Path) -> Result<Trainer> {
    let (config, arch, _, _) = read(path)?;
    let model = Model::zeroed(config, arch)?;
    let loaded = parse(path, &model)?;
    let mut trainer = Trainer::for_task(model, loaded.options.clone())?;
    debug_assert_eq!(trainer.model.config().to_json_string(), loaded.config.to_json_string());
    apply(&mut trainer, loaded)?;
    Ok(trainer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_trainer() -> Trainer {
        let config = BeitConfig::from_json_str(
            r#"{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
            "image_size": 8, "patch_size": 4, "num_channels": 1, "vocab_size": 8, "use_mask_token": true}"#,
        )
        .unwrap();
        let model = Model::new_random(config, Architecture::MaskedImageModeling, 1).unwrap();
        Trainer::new(model, TrainerOptions::default()).unwrap()
    }

    fn meta_json(path: &Path) -> serde_json::Value {
        let text = SafetensorsFile::open(path).unwrap().metadata().unwrap().remove(META_KEY).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn the_run_record_round_trips_and_is_absent_when_unset() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, recorded) = (dir.path().join("plain"), dir.path().join("recorded"));
        let mut t = tiny_trainer();
        t.save_checkpoint(&plain).unwrap();
        // No record: no `run` key at all, so these bytes are what a libbeit without the field wrote.
        assert!(meta_json(&plain).get("run").is_none());
        assert!(Trainer::from_checkpoint(&plain).unwrap().run_record().is_none());

        let mut record = RunRecord::new();
        record.set("--batch", 4).set("--masking", "block");
        t.set_run_record(Some(record.clone()));
        t.save_checkpoint(&recorded).unwrap();
        assert_eq!(meta_json(&recorded)["run"]["--batch"]["value"], "4");
        assert_eq!(Trainer::from_checkpoint(&recorded).unwrap().run_record(), Some(&record));

        // Loading into a trainer takes the checkpoint's record, or its absence.
        let mut other = tiny_trainer();
        other.load_checkpoint(&recorded).unwrap();
        assert_eq!(other.run_record(), Some(&record));
        other.load_checkpoint(&plain).unwrap();
        assert_eq!(other.run_record(), None);

        // Unsetting it gives back the record-less bytes.
        t.set_run_record(None);
        t.save_checkpoint(&recorded).unwrap();
        assert_eq!(std::fs::read(&plain).unwrap(), std::fs::read(&recorded).unwrap());
    }

    /// `path`'s bytes with the checkpoint metadata's model config edited by `edit`.
    fn with_config_edited(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let mut meta = meta_json(path);
        let mut config: serde_json::Value = serde_json::from_str(meta["config"].as_str().unwrap()).unwrap();
        edit(config.as_object_mut().unwrap());
        meta["config"] = config.to_string().into();
        header["__metadata__"][META_KEY] = meta.to_string().into();
        let mut text = header.to_string().into_bytes();
        text.resize(text.len().div_ceil(8) * 8, b' '); // safetensors pads the header to 8 bytes
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&text);
        out.extend_from_slice(&bytes[8 + n..]);
        out
    }

    #[test]
    fn a_checkpoint_whose_config_lacks_architectures_loads() {
        // The metadata names the class; the config's `architectures` (absent, or another name)
        // does not make the checkpoint another model's.
        let dir = tempfile::tempdir().unwrap();
        let (saved, edited) = (dir.path().join("saved"), dir.path().join("edited"));
        let t = tiny_trainer();
        t.save_checkpoint(&saved).unwrap();
        for edit in [
            Box::new(|c: &mut serde_json::Map<_, _>| {
                c.remove("architectures");
            }) as Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>,
            Box::new(|c: &mut serde_json::Map<_, _>| {
                c.insert("architectures".into(), serde_json::json!(["BeitModel"]));
            }),
        ] {
            std::fs::write(&edited, with_config_edited(&saved, edit)).unwrap();
            let loaded = Trainer::from_checkpoint(&edited).unwrap();
            assert!(config_differences(loaded.model.config(), t.model.config()).is_empty());
            let mut other = tiny_trainer();
            other.load_checkpoint(&edited).unwrap();
            assert_eq!(other.model.params().data, t.model.params().data);
        }
    }
}
