//! Classification fine-tuning (BEIT_SPEC §7, unilm `run_class_finetuning.py`): turning a
//! pretrained directory (or a preset, for a from-scratch baseline) into a
//! `BeitForImageClassification`, the stratified labelled subset of a dataset, and the training
//! loop over the augmenting loader. The optimizer, schedule, layer decay, clipping, drop path and
//! checkpoints are the [`Trainer`]'s.
//!
//! What BEiT does when it starts fine-tuning, and what is done here:
//! - the shared relative position bias of pretraining is copied into every block's own table
//!   (unilm: "Expand the shared relative position embedding to each transformer block"), so the
//!   blocks' biases can diverge; the config switches to per-layer tables;
//! - the mask token and the MIM head (`layernorm`, `lm_head`) are dropped;
//! - the new head is fresh: `beit.pooler.layernorm` 1/0, `classifier.weight` truncated normal
//!   (std `initializer_range`) × 0.001 (`init_scale`), bias 0; a pretrained classifier whose
//!   shape differs is dropped likewise;
//! - `drop_path_rate` is the fine-tuning value.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use crate::data::dataset::{Dataset, DatasetSpec, DatasetWriter};
use crate::data::loader::{Loader, LoaderConfig};
use crate::error::Result;
use crate::model::params::ParamStore;
use crate::model::{Architecture, BeitConfig, ClassifyBatch, Model};
use crate::resources::{Bytes, Need, MAX_LABELS};

use super::trainer::{StepStats, Trainer};

/// Bytes one label takes in a config's `id2label` and `label2id` maps, from above (two keys, a
/// string and a number, and the maps' nodes).
const LABEL_MAP_BYTES_PER_LABEL: u64 = 256;

/// The classification config BEiT fine-tunes from a (pretraining) config: labels `0..num_labels`
/// (`id2label`/`label2id` as HF writes them), no mask token, per-layer relative position bias
/// where pretraining shared one, and the given drop path rate. `num_labels` must be 1 to
/// [`MAX_LABELS`], and its label maps must fit the memory budget.
pub fn classification_config(source: &BeitConfig, num_labels: usize, drop_path_rate: f64) -> Result<BeitConfig> {
    ensure!(
        (1..=MAX_LABELS).contains(&num_labels),
        InvalidArgument,
        "num_labels must be between 1 and {MAX_LABELS}, got {num_labels}"
    );
    Need::new(format!("the label maps of {num_labels} labels"), Bytes::new(LABEL_MAP_BYTES_PER_LABEL) * num_labels)
        .check()?;
    let mut cfg = source.clone();
    let id2label: Map<String, Value> = (0..num_labels).map(|i| (i.to_string(), Value::String(i.to_string()))).collect();
    let label2id: Map<String, Value> = (0..num_labels).map(|i| (i.to_string(), Value::from(i))).collect();
    cfg.id2label = Some(id2label);
    cfg.num_labels = None;
    cfg.extra.insert("label2id".into(), Value::Object(label2id));
    cfg.architectures = Some(vec![Architecture::ImageClassification.hf_name().to_string()]);
    cfg.use_mask_token = false;
    if cfg.use_shared_relative_position_bias {
        cfg.use_shared_relative_position_bias = false;
        cfg.use_relative_position_bias = true;
    }
    cfg.drop_path_rate = drop_path_rate;
    Ok(cfg)
}

/// Name of the per-layer relative position table of block `l` (HF names).
fn layer_table_name(l: usize) -> String {
    format!("beit.encoder.layer.{l}.attention.attention.relative_position_bias.relative_position_bias_table")
}

const SHARED_TABLE: &str = "beit.encoder.relative_position_bias.relative_position_bias_table";

/// A source tensor by its classification-model name (`BeitModel` weights have no `beit.`).
fn source_tensor<'a>(src: &'a ParamStore, name: &str) -> Option<&'a [f32]> {
    let id = src.find(name).or_else(|| src.find(name.strip_prefix("beit.")?))?;
    src.specs[id.0].exported.then(|| src.get(id))
}

/// A `BeitForImageClassification` with `num_labels` labels initialised from `pretrained`
/// (a `BeitForMaskedImageModeling`, `BeitModel` or `BeitForImageClassification`) as BEiT does
/// (see the module docs). Fresh entries are drawn from `seed`. Returns the model and the names
/// of the entries that did not come from `pretrained`.
pub fn classifier_from_pretrained(
    pretrained: &Model,
    num_labels: usize,
    drop_path_rate: f64,
    seed: u64,
) -> Result<(Model, Vec<String>)> {
    let cfg = classification_config(pretrained.config(), num_labels, drop_path_rate)?;
    let mut model = Model::new_random(cfg, Architecture::ImageClassification, seed)?;
    let src = pretrained.params();
    let layers = pretrained.config().num_hidden_layers;
    let mut fresh = Vec::new();
    let specs = model.params().specs.clone();
    for spec in specs.iter().filter(|s| s.exported) {
        let dst = &mut model.params_mut().data[spec.offset..spec.offset + spec.len];
        let layer_table = (0..layers).find(|&l| layer_table_name(l) == spec.name);
        if let Some(l) = layer_table {
            // The bias a block used in pretraining: its own table plus the shared one.
            let own = source_tensor(src, &layer_table_name(l));
            let shared = source_tensor(src, SHARED_TABLE);
            ensure!(
                own.is_some() || shared.is_some(),
                Format,
                "the pretrained model has no relative position table for block {l}"
            );
            dst.fill(0.0);
            for t in [own, shared].into_iter().flatten() {
                ensure!(t.len() == dst.len(), Format, "{}: table size differs from the config's", spec.name);
                dst.iter_mut().zip(t).for_each(|(d, &s)| *d += s);
            }
            continue;
        }
        let is_head = spec.name.starts_with("classifier.") || spec.name.starts_with("beit.pooler.");
        match source_tensor(src, &spec.name) {
            Some(t) if t.len() == spec.len => dst.copy_from_slice(t),
            _ if is_head => fresh.push(spec.name.clone()),
            Some(_) => bail!(Format, "{}: the pretrained tensor's size differs from the config's", spec.name),
            None => bail!(Format, "the pretrained model has no tensor {}", spec.name),
        }
    }
    Ok((model, fresh))
}

/// A stratified, seeded subset of labelled samples: for each class with `n` samples,
/// `round(fraction·n)` of them (at least one when `fraction > 0`), drawn without replacement by
/// a ChaCha8 shuffle keyed by `seed` and the class. Returns dataset indices in increasing order.
pub fn stratified_subset(labels: &[u32], fraction: f64, seed: u64) -> Result<Vec<usize>> {
    ensure!(fraction > 0.0 && fraction <= 1.0, InvalidArgument, "the label fraction must be in (0, 1], got {fraction}");
    let mut by_class: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut picked = Vec::new();
    for (class, mut members) in by_class {
        let take = ((fraction * members.len() as f64).round() as usize).clamp(1, members.len());
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(class) << 32) ^ 0x5354_5241_5449_4659);
        members.shuffle(&mut rng);
        picked.extend_from_slice(&members[..take]);
    }
    picked.sort_unstable();
    Ok(picked)
}

/// Every label of a dataset (an error when it has none).
pub fn dataset_labels(ds: &Dataset) -> Result<Vec<u32>> {
    ensure!(ds.header().has_labels(), InvalidArgument, "{} has no labels", ds.path().display());
    Ok((0..ds.len()).map(|i| ds.label(i).expect("has labels")).collect())
}

/// The number of classes labels imply: the largest label plus one. A label at or above
/// [`MAX_LABELS`] is refused, naming the sample: one hostile value would otherwise set a class
/// count of billions (and a classifier head and tables to match). An empty list is an error too.
pub fn num_labels_from_data(labels: &[u32]) -> Result<usize> {
    let Some((i, &max)) = labels.iter().enumerate().max_by_key(|&(_, &l)| l) else {
        bail!(InvalidArgument, "there are no labels to count classes from");
    };
    ensure!(
        (max as usize) < MAX_LABELS,
        InvalidArgument,
        "sample {i} has label {max}, which would make {} classes; at most {MAX_LABELS} are supported \
         (pass the number of labels explicitly, or fix the data)",
        max as u64 + 1
    );
    Ok(max as usize + 1)
}

/// The first sample of `ds` whose label is not in `0..num_labels`, as an error naming it.
fn check_labels_below(ds: &Dataset, num_labels: usize) -> Result<()> {
    ensure!(num_labels > 0, InvalidArgument, "the model has no labels (num_labels 0)");
    if let Some((i, l)) = (0..ds.len()).filter_map(|i| Some((i, ds.label(i)?))).find(|&(_, l)| l as usize >= num_labels)
    {
        bail!(
            InvalidArgument,
            "{}: sample {i} has label {l}, but the model has {num_labels} labels (0 to {})",
            ds.path().display(),
            num_labels - 1
        );
    }
    Ok(())
}

/// Optimizer steps in one epoch of classification fine-tuning over `dataset_len` samples in
/// batches of `batch_size`: the full batches, or one short batch when the data holds fewer than
/// one batch ([`classification_loader`] drops the last incomplete batch otherwise).
pub fn steps_per_epoch(dataset_len: usize, batch_size: usize) -> Result<u64> {
    ensure!(batch_size > 0, InvalidArgument, "the batch size must be positive, got 0");
    ensure!(dataset_len > 0, InvalidArgument, "the dataset holds no samples to fine-tune on");
    Ok(if dataset_len >= batch_size { (dataset_len / batch_size) as u64 } else { 1 })
}

/// The total steps of a fine-tuning run: `steps` when given, else `epochs` epochs of
/// [`steps_per_epoch`]; refuses 0 steps, and epochs whose step count overflows.
pub fn total_steps(dataset_len: usize, batch_size: usize, epochs: u64, steps: Option<u64>) -> Result<u64> {
    let per_epoch = steps_per_epoch(dataset_len, batch_size)?;
    let total = match steps {
        Some(s) => s,
        None => epochs.checked_mul(per_epoch).ok_or_else(|| {
            crate::error::Error::InvalidArgument(format!(
                "{epochs} epochs of {per_epoch} steps is more than 2^64 steps"
            ))
        })?,
    };
    ensure!(total > 0, InvalidArgument, "fine-tuning needs at least one step (steps {steps:?}, epochs {epochs})");
    Ok(total)
}

/// Writes the samples `indices` of `ds` (pixels and labels) as a new dataset file at `path`.
pub fn write_subset(ds: &Dataset, indices: &[usize], path: &Path) -> Result<()> {
    let h = ds.header();
    let spec = DatasetSpec {
        height: h.height,
        width: h.width,
        channels: h.channels,
        labels: true,
        masks: false,
        token_grid: None,
    };
    let mut w = DatasetWriter::create(path, spec)?;
    w.reserve(indices.len())?;
    for &i in indices {
        w.push(ds.pixels(i), ds.label(i), None, None)?;
    }
    w.finish()?;
    Ok(())
}

/// How the fine-tuning loop feeds the trainer.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneData {
    pub batch_size: usize,
    /// Steps to run in total (the trainer's step count ends here).
    pub steps: u64,
    pub label_smoothing: f32,
    /// Random resized crop scale range (BEiT / timm: (0.08, 1)).
    pub crop_scale: (f64, f64),
    /// Horizontal flip probability (0.5 in BEiT; 0 for data where mirroring changes the class).
    pub flip_prob: f64,
    /// Seeds the epoch orders and augmentations.
    pub seed: u64,
    /// Loader worker threads (batches are identical for any count).
    pub workers: usize,
}

/// The augmenting loader for classification: the pretraining loader's view 1 (flip, random
/// resized crop, bicubic to the model's size, normalised with mean = std = 0.5) and labels. It
/// also draws a one-patch mask and a 1×1 tokenizer view per image, which are ignored (the
/// loader is shared with pretraining; both cost next to nothing).
pub fn classification_loader(ds: Arc<Dataset>, model: &Model, data: &FinetuneData) -> Result<Loader> {
    ensure!(ds.header().has_labels(), InvalidArgument, "{} has no labels to fine-tune on", ds.path().display());
    ensure!(data.batch_size > 0, InvalidArgument, "the fine-tuning batch size must be positive, got 0");
    let cfg = model.config();
    let config = LoaderConfig {
        tokenizer_size: (1, 1),
        min_mask_block: 1,
        scale: data.crop_scale,
        flip_prob: data.flip_prob,
        seed: data.seed,
        workers: data.workers.max(1),
        prefetch: data.workers.max(1).saturating_mul(2),
        drop_last: ds.len() >= data.batch_size,
        ..LoaderConfig::beit(data.batch_size, cfg.image_size.hw(), cfg.patch_size.hw(), 1)
    };
    Loader::new(ds, config)
}

/// The name the labelled subset of a run is written under (as a temporary file, see
/// [`subset_dataset`]).
pub const SUBSET_FILE: &str = "labelled-subset.beitds";

/// The samples a run with label fraction `fraction` trains on, given every label of the
/// dataset: `None` (all of them) for 1, else the [`stratified_subset`] seeded by `seed`.
pub fn label_fraction_subset(labels: &[u32], fraction: f64, seed: u64) -> Result<Option<Vec<usize>>> {
    if fraction == 1.0 {
        return Ok(None);
    }
    stratified_subset(labels, fraction, seed).map(Some)
}

/// The data a run trains on: `full` itself without a subset, else the samples `subset` of it
/// as their own small dataset (the loader reads whole files). That is written under a
/// temporary name in `scratch_dir` and removed as soon as it is mapped (the map keeps the
/// data); a run killed in between leaves a `.labelled-subset.beitds.tmp-*` file there, which
/// `crate::files::remove_stale_temp_files` clears.
pub fn subset_dataset(full: &Arc<Dataset>, subset: Option<&[usize]>, scratch_dir: &Path) -> Result<Arc<Dataset>> {
    let Some(subset) = subset else { return Ok(full.clone()) };
    let path = crate::files::temp_path_beside(&scratch_dir.join(SUBSET_FILE))?;
    let opened = write_subset(full, subset, &path).and_then(|_| Dataset::open(&path));
    let _ = std::fs::remove_file(&path);
    Ok(Arc::new(opened?))
}

/// Runs `trainer` (a classification trainer) up to `data.steps` steps over `ds`, epoch after
/// epoch, resuming at the trainer's data position; calls `on_step` after every step.
pub fn run_finetune(
    trainer: &mut Trainer,
    ds: Arc<Dataset>,
    data: &FinetuneData,
    mut on_step: impl FnMut(&StepStats),
) -> Result<()> {
    run_finetune_until(trainer, ds, data, |s| {
        on_step(s);
        ControlFlow::Continue(())
    })?;
    Ok(())
}

/// [`run_finetune`] whose `on_step` may stop the run: after a `Break` no further step is taken
/// and the trainer stays as that step left it (a later call resumes there). Returns whether
/// the run reached `data.steps`.
pub fn run_finetune_until(
    trainer: &mut Trainer,
    ds: Arc<Dataset>,
    data: &FinetuneData,
    mut on_step: impl FnMut(&StepStats) -> ControlFlow<()>,
) -> Result<bool> {
    ensure!(data.batch_size > 0, InvalidArgument, "the fine-tuning batch size must be positive, got 0");
    ensure!(data.steps > 0, InvalidArgument, "fine-tuning needs at least one step, got 0");
    ensure!(
        (0.0..1.0).contains(&data.label_smoothing),
        InvalidArgument,
        "label smoothing must be in [0, 1), got {}",
        data.label_smoothing
    );
    let num_labels = trainer.model().config().num_labels();
    let loader = classification_loader(ds, trainer.model(), data)?;
    // Every label is checked before the first step, so a bad sample cannot stop a run midway.
    check_labels_below(loader.dataset(), num_labels)?;
    let per_epoch = loader.num_batches() as u64;
    ensure!(per_epoch > 0, InvalidArgument, "the dataset holds no batch");
    while trainer.step_count() < data.steps {
        let position = trainer.data_position();
        let (epoch, start) = (position / per_epoch, (position % per_epoch) as usize);
        let epoch_loader = loader.with_epoch(epoch)?;
        for batch in epoch_loader.starting_at(start)? {
            if trainer.step_count() >= data.steps {
                break;
            }
            let labels: Vec<i64> = batch.labels.as_ref().expect("labelled dataset").iter().map(|&l| l as i64).collect();
            let (h, w) = batch.image_size;
            let cb = ClassifyBatch {
                pixels: &batch.view1,
                batch: batch.len(),
                channels: batch.channels,
                height: h,
                width: w,
                labels: &labels,
            };
            let stats = trainer.step_classify(&cb, data.label_smoothing)?;
            if on_step(&stats).is_break() {
                return Ok(trainer.step_count() >= data.steps);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_subset_keeps_class_proportions() {
        // 3 classes of 100, 50 and 10 samples, interleaved.
        let mut labels = Vec::new();
        for i in 0..160u32 {
            labels.push(match i % 16 {
                0 => 2,
                1..=5 => 1,
                _ => 0,
            });
        }
        let count = |idx: &[usize], c: u32| idx.iter().filter(|&&i| labels[i] == c).count();
        let n = |c: u32| labels.iter().filter(|&&l| l == c).count();
        assert_eq!((n(0), n(1), n(2)), (100, 50, 10));
        let sub = stratified_subset(&labels, 0.1, 7).unwrap();
        assert_eq!((count(&sub, 0), count(&sub, 1), count(&sub, 2)), (10, 5, 1));
        assert!(sub.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        // Seeded: the same seed picks the same samples, another seed others.
        assert_eq!(sub, stratified_subset(&labels, 0.1, 7).unwrap());
        assert_ne!(sub, stratified_subset(&labels, 0.1, 8).unwrap());
        // A tiny fraction still keeps one sample of every class; 1 keeps everything.
        let tiny = stratified_subset(&labels, 0.001, 7).unwrap();
        assert_eq!((count(&tiny, 0), count(&tiny, 1), count(&tiny, 2)), (1, 1, 1));
        assert_eq!(stratified_subset(&labels, 1.0, 7).unwrap(), (0..160).collect::<Vec<_>>());
        assert!(stratified_subset(&labels, 0.0, 7).is_err());
        assert!(stratified_subset(&labels, 1.5, 7).is_err());
    }

    #[test]
    fn shared_table_is_copied_into_every_block() {
        let cfg = BeitConfig::from_json_str(
            r#"{"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
                "image_size": 8, "patch_size": 4, "num_channels": 1, "vocab_size": 4, "use_mask_token": true,
                "use_shared_relative_position_bias": true}"#,
        )
        .unwrap();
        let mut mim = Model::new_random(cfg, Architecture::MaskedImageModeling, 3).unwrap();
        let shared = mim.params().find(SHARED_TABLE).unwrap();
        let table: Vec<f32> = (0..mim.params().get(shared).len()).map(|i| i as f32 * 0.01).collect();
        mim.params_mut().get_mut(shared).copy_from_slice(&table);
        let (cls, fresh) = classifier_from_pretrained(&mim, 3, 0.1, 0).unwrap();
        let c = cls.config();
        assert!(c.use_relative_position_bias && !c.use_shared_relative_position_bias && !c.use_mask_token);
        assert_eq!(c.num_labels(), 3);
        for l in 0..2 {
            let id = cls.params().find(&layer_table_name(l)).unwrap();
            assert_eq!(cls.params().get(id), &table[..]);
        }
        let q = "beit.encoder.layer.1.attention.attention.query.weight";
        assert_eq!(cls.params().get(cls.params().find(q).unwrap()), mim.params().get(mim.params().find(q).unwrap()));
        assert_eq!(
            fresh,
            ["beit.pooler.layernorm.weight", "beit.pooler.layernorm.bias", "classifier.weight", "classifier.bias"]
        );
    }

    #[test]
    fn backbone_weights_load_without_their_missing_prefix() {
        // BeitModel directories name tensors without `beit.`; its pooler comes along, only the
        // classifier is new.
        let cfg = BeitConfig::from_json_str(
            r#"{"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
                "image_size": 8, "patch_size": 4, "num_channels": 1, "use_relative_position_bias": true}"#,
        )
        .unwrap();
        let backbone = Model::new_random(cfg, Architecture::Backbone, 4).unwrap();
        let (cls, fresh) = classifier_from_pretrained(&backbone, 2, 0.0, 0).unwrap();
        assert_eq!(fresh, ["classifier.weight", "classifier.bias"]);
        let get = |m: &Model, n: &str| m.params().get(m.params().find(n).unwrap()).to_vec();
        assert_eq!(
            get(&cls, "beit.encoder.layer.0.output.dense.weight"),
            get(&backbone, "encoder.layer.0.output.dense.weight")
        );
        // A classifier with another label count keeps its backbone, gets a fresh head.
        let (again, fresh) = classifier_from_pretrained(&cls, 5, 0.0, 1).unwrap();
        assert_eq!(fresh, ["classifier.weight", "classifier.bias"]);
        assert_eq!(again.config().num_labels(), 5);
        assert_eq!(get(&again, "beit.pooler.layernorm.weight"), get(&cls, "beit.pooler.layernorm.weight"));
    }
}
