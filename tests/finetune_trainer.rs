//! The classification trainer and fine-tuning loop: deterministic (drop path included), learns on
//! a small labelled dataset through the augmenting loader, resumes from a checkpoint bit for bit
//! (epoch position included), and the layer-wise lr decay reaches the optimizer.

use std::path::Path;
use std::sync::Arc;

use beit::data::dataset::Dataset;
use beit::train::finetune::{classifier_from_pretrained, run_finetune, FinetuneData};
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::Model;

fn reference() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference_finetune"))
}

fn dataset() -> Arc<Dataset> {
    Arc::new(Dataset::open(&reference().join("train.beitds")).unwrap())
}

fn options(steps: u64) -> TrainerOptions {
    TrainerOptions {
        learning_rate: 5e-3,
        min_learning_rate: 1e-5,
        warmup_steps: 3,
        total_steps: steps,
        beta2: 0.999,
        clip_grad_norm: 0.0,
        drop_path_rate: Some(0.1),
        layer_decay: 0.75,
        seed: 5,
        ..TrainerOptions::default()
    }
}

fn feed(steps: u64) -> FinetuneData {
    FinetuneData {
        batch_size: 8,
        steps,
        label_smoothing: 0.1,
        crop_scale: (0.5, 1.0),
        flip_prob: 0.5,
        seed: 2,
        workers: 2,
    }
}

fn trainer(steps: u64) -> Trainer {
    let pretrained = Model::load(&reference().join("pretrained")).unwrap();
    let (model, _) = classifier_from_pretrained(&pretrained, 3, 0.1, 0).unwrap();
    Trainer::new_classifier(model, options(steps)).unwrap()
}

fn run(t: &mut Trainer, steps: u64) -> Vec<f64> {
    let mut losses = Vec::new();
    run_finetune(t, dataset(), &feed(steps), |s| losses.push(s.loss)).unwrap();
    losses
}

fn param_bits(t: &Trainer) -> Vec<u32> {
    t.model().params().data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn finetuning_is_deterministic_and_learns() {
    // 48 samples / batch 8 = 6 batches per epoch: 30 steps cross 5 epoch boundaries.
    let (mut a, mut b) = (trainer(30), trainer(30));
    let (la, lb) = (run(&mut a, 30), run(&mut b, 30));
    assert_eq!(la.len(), 30);
    assert_eq!(la.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), lb.iter().map(|l| l.to_bits()).collect::<Vec<_>>());
    assert_eq!(param_bits(&a), param_bits(&b));
    let first = la[..5].iter().sum::<f64>() / 5.0;
    let last = la[25..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "loss did not fall: {la:?}");
}

#[test]
fn checkpoint_resume_is_bit_identical() {
    let mut straight = trainer(14);
    let want = run(&mut straight, 14);
    let mut first = trainer(14);
    let mut got = run(&mut first, 9);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    first.save_checkpoint(&path).unwrap();
    let mut resumed = Trainer::from_checkpoint(&path).unwrap();
    assert_eq!(resumed.model().architecture().hf_name(), "BeitForImageClassification");
    got.extend(run(&mut resumed, 14));
    assert_eq!(got, want);
    assert_eq!(param_bits(&resumed), param_bits(&straight));
    // A pretraining trainer refuses a classification checkpoint.
    let cfg =
        beit::BeitConfig::from_json_str(&std::fs::read_to_string(reference().join("pretrained/config.json")).unwrap())
            .unwrap();
    let mut mim =
        Trainer::new(Model::new_random(cfg, beit::Architecture::MaskedImageModeling, 0).unwrap(), options(5)).unwrap();
    let err = mim.load_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("BeitForImageClassification"), "{err}");
}

#[test]
fn layer_decay_scales_the_update_per_block() {
    // One step without weight decay: AdamW's first update is lr·scale·g/(|g|+eps) ≈ ±lr·scale
    // per element, so |Δ| of an element of block l (id l+1) over that of the head (id L+1) is
    // decay^(L−l), and the patch embedding (id 0) gets decay^(L+1).
    let mut t = trainer(10);
    let opts =
        TrainerOptions { weight_decay: 0.0, warmup_steps: 0, total_steps: 0, drop_path_rate: Some(0.0), ..options(0) };
    t = Trainer::new_classifier(t.into_model(), opts).unwrap();
    let before = t.model().params().data.clone();
    run(&mut t, 1);
    let p = t.model().params();
    let largest = |name: &str| {
        let s = &p.specs[p.find(name).unwrap().0];
        (s.offset..s.offset + s.len).map(|i| (p.data[i] - before[i]).abs()).fold(0.0f32, f32::max)
    };
    let head = largest("classifier.weight");
    assert!((head - 5e-3).abs() < 1e-4, "head step {head}");
    let last_block = largest("beit.encoder.layer.1.intermediate.dense.weight");
    let first_block = largest("beit.encoder.layer.0.intermediate.dense.weight");
    let embed = largest("beit.embeddings.patch_embeddings.projection.weight");
    for (got, power) in [(last_block, 1), (first_block, 2), (embed, 3)] {
        let want = 5e-3 * 0.75f32.powi(power);
        assert!((got - want).abs() < 0.02 * want, "decay^{power}: step {got}, expected {want}");
    }
}
