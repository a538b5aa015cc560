//! Hostile sizes and values in the data, tokenizer, evaluation and fine-tuning code are refused
//! with an error that names the value, before anything large is allocated (issue 16): tokenizer
//! configs and passes, the loader, dataset files and importers, class counts derived from data,
//! evaluation tables and fine-tuning options. Budgets are set small with `with_budget`, so a
//! refusal never depends on the memory of the machine running the test.

use std::path::Path;
use std::sync::Arc;

use beit::data::dataset::{Dataset, DatasetHeader, DatasetSpec, DatasetWriter};
use beit::data::import::{import_idx_padded, import_image_folder, import_npy, read_idx_images};
use beit::data::loader::{Loader, LoaderConfig};
use beit::data::token_cache::{dataset_inputs, tokenize_dataset, tokenizer_input};
use beit::dvae::network::DvaeNetworks;
use beit::dvae::{Dvae, DvaeConfig};
use beit::resources::{with_budget, MemoryBudget, MAX_LABELS, MAX_LOADER_WORKERS};
use beit::train::dvae::{DvaeTrainOptions, DvaeTrainer};
use beit::train::evaluate::evaluate;
use beit::train::finetune::{
    classification_config, num_labels_from_data, run_finetune, steps_per_epoch, total_steps, FinetuneData,
};
use beit::train::segmentation::{
    evaluate as seg_evaluate, finetune as seg_finetune, from_pretrained_backbone, segmentation_config,
    SegFinetuneOptions,
};
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Architecture, BeitConfig, Error, Model};

/// The message of an `Error::InvalidArgument`, or a panic naming what came instead.
fn invalid(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

fn config_err(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::Config(m)) => m,
        other => panic!("expected Config, got {other:?}"),
    }
}

fn format_err(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::Format(m)) => m,
        other => panic!("expected Format, got {other:?}"),
    }
}

fn assert_names(message: &str, needles: &[&str]) {
    for n in needles {
        assert!(message.contains(n), "{n:?} not in {message:?}");
    }
}

const MIB: u64 = 1 << 20;

/// Writes a dataset of `n` images `size`x`size`x`channels` with `labels` (one per image, when
/// given) and masks (`mask(i)`, when given), and opens it.
fn write_dataset(
    path: &Path,
    n: usize,
    size: usize,
    channels: usize,
    labels: Option<&dyn Fn(usize) -> u32>,
    mask: Option<&dyn Fn(usize) -> Vec<u8>>,
) -> Arc<Dataset> {
    let spec = DatasetSpec {
        height: size as u32,
        width: size as u32,
        channels: channels as u32,
        labels: labels.is_some(),
        masks: mask.is_some(),
        token_grid: None,
    };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..n {
        let px: Vec<u8> = (0..size * size * channels).map(|p| ((i * 31 + p * 7) % 256) as u8).collect();
        let m = mask.map(|f| f(i));
        w.push(&px, labels.map(|f| f(i)), m.as_deref(), None).unwrap();
    }
    w.finish().unwrap();
    Arc::new(Dataset::open(path).unwrap())
}

// ---------------------------------------------------------------------------------------------
// The tokenizer.

fn tiny_tokenizer(in_channels: usize) -> DvaeConfig {
    DvaeConfig {
        model_type: "beit-dvae".into(),
        in_channels,
        image_size: 8,
        vocab_size: 12,
        n_hid: 8,
        group_count: 2,
        n_blk_per_group: 1,
        decoder_n_init: Some(8),
    }
}

#[test]
fn tokenizer_config_caps_every_field() {
    let base = tiny_tokenizer(1);
    let cases: Vec<(DvaeConfig, &[&str])> = vec![
        (DvaeConfig { in_channels: 5, ..base.clone() }, &["in_channels", "5"]),
        (DvaeConfig { group_count: 7, ..base.clone() }, &["group_count", "7"]),
        (DvaeConfig { n_blk_per_group: 17, ..base.clone() }, &["n_blk_per_group", "17"]),
        (DvaeConfig { n_hid: 4100, ..base.clone() }, &["n_hid", "4100"]),
        (DvaeConfig { n_hid: 6, ..base.clone() }, &["n_hid", "6"]),
        // Each width is allowed, but 4096 doubled over 6 groups is a 131072-channel group.
        (
            DvaeConfig { n_hid: 4096, group_count: 6, image_size: 64, ..base.clone() },
            &["n_hid 4096", "6 groups", "65536"],
        ),
        (DvaeConfig { vocab_size: 1, ..base.clone() }, &["vocab_size", "1"]),
        (DvaeConfig { vocab_size: 70_000, ..base.clone() }, &["vocab_size", "70000"]),
        (DvaeConfig { image_size: 9, ..base.clone() }, &["image_size 9", "downsampling factor 2"]),
        (DvaeConfig { image_size: 8192, ..base.clone() }, &["image_size 8192", "4096"]),
        (DvaeConfig { decoder_n_init: Some(0), ..base.clone() }, &["decoder_n_init", "0"]),
        (DvaeConfig { decoder_n_init: Some(5000), ..base.clone() }, &["decoder_n_init", "5000"]),
    ];
    for (cfg, needles) in cases {
        let m = config_err(Dvae::new(cfg.clone(), 0));
        assert_names(&m, needles);
        // The same check guards config.json: a tokenizer directory with this config never
        // reaches its weights (there are none here).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), cfg.to_json()).unwrap();
        assert_names(&config_err(Dvae::load(dir.path())), needles);
    }
    assert!(Dvae::new(base, 0).is_ok());
}

#[test]
fn tokenizer_parameters_are_counted_and_budgeted_before_they_exist() {
    for cfg in [DvaeConfig::dalle(), DvaeConfig::small_grey(32), tiny_tokenizer(3)] {
        let (store, _) = DvaeNetworks::build(&cfg).unwrap();
        assert_eq!(DvaeNetworks::param_count(&cfg), Some(store.data.len()), "{cfg:?}");
    }
    // DALL-E's encoder has 53.8 M parameters (215 MB): not within a 64 MiB budget.
    let m = with_budget(MemoryBudget::Bytes(64 * MIB), || config_err(Dvae::new(DvaeConfig::dalle(), 0)));
    assert_names(&m, &["parameters of this tokenizer config", "64.0 MiB"]);
    // A wide 5-group tokenizer has about 131 G parameters (489 GiB).
    let wide = DvaeConfig { n_hid: 4096, group_count: 5, image_size: 64, ..tiny_tokenizer(1) };
    let m = with_budget(MemoryBudget::Bytes(64 << 30), || config_err(Dvae::new(wide, 0)));
    assert_names(&m, &["parameters of this tokenizer config", "would need"]);
}

#[test]
fn tokenizer_load_names_a_non_finite_tensor() {
    let dvae = Dvae::new(tiny_tokenizer(1), 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut bad = dvae.clone();
    let id = bad.params.find("encoder.blocks.group_2.block_1.res_path.conv_3.w").unwrap();
    bad.params.get_mut(id)[5] = f32::NAN;
    bad.save(dir.path()).unwrap();
    let m = format_err(Dvae::load(dir.path()));
    assert_names(&m, &["encoder.blocks.group_2.block_1.res_path.conv_3.w", "NaN", "index 5"]);
}

#[test]
fn tokenizing_decoding_and_training_are_budgeted() {
    let dvae = Dvae::new(DvaeConfig::small_grey(32), 0).unwrap();
    let images = vec![0.5f32; 4 * dvae.image_len()];
    let m = with_budget(MemoryBudget::Bytes(MIB), || invalid(dvae.tokenize(&images)));
    assert_names(&m, &["tokenizing 4 image(s) of 1x32x32", "1.0 MiB"]);
    let m = with_budget(MemoryBudget::Bytes(MIB), || invalid(dvae.logits(&images)));
    assert_names(&m, &["tokenizing 4 image(s)", "fewer images"]);
    let tokens = dvae.tokenize(&images).unwrap();
    let m = with_budget(MemoryBudget::Bytes(MIB), || invalid(dvae.decode(&tokens)));
    assert_names(&m, &["decoding 4 token grid(s)"]);

    let mut trainer = DvaeTrainer::new(dvae, DvaeTrainOptions::for_steps(10)).unwrap();
    let m = with_budget(MemoryBudget::Bytes(64 * MIB), || invalid(trainer.step(&images)));
    assert_names(&m, &["tokenizer training step on 4 image(s)", "8192 codes", "smaller batch"]);
    assert_eq!(trainer.step_count(), 0);
    assert_names(&invalid(trainer.check_batch(0)), &["got 0"]);
    // The estimate grows with the batch (all but the column matrices of the images in flight).
    let one = trainer.step_bytes(1).get().unwrap();
    assert!(trainer.step_bytes(64).get().unwrap() > 32 * one);
    assert!(trainer.step(&images).is_ok());
}

#[test]
fn tokenizer_inputs_refuse_a_channel_count_the_tokenizer_does_not_take() {
    let dir = tempfile::tempdir().unwrap();
    let grey = Dvae::new(tiny_tokenizer(1), 0).unwrap();
    let rgb_data = write_dataset(&dir.path().join("rgb.beitds"), 3, 8, 3, None, None);
    // RGB images for a grey tokenizer: before, three planes read as three grey images.
    let m = invalid(dataset_inputs(&rgb_data, &grey, 10));
    assert_names(&m, &["rgb.beitds", "3 channels", "takes 1"]);
    assert_names(&invalid(tokenizer_input(rgb_data.pixels(0), 3, 8, 8, &grey)), &["3 channels", "takes 1"]);
    let out = dir.path().join("tokens.beitds");
    assert_names(&invalid(tokenize_dataset(&grey, &rgb_data, &out, |_| {})), &["3 channels", "takes 1"]);
    assert!(!out.exists());
    // Pixels that do not match the shape given.
    assert_names(&invalid(tokenizer_input(&[0u8; 10], 1, 8, 8, &grey)), &["8x8x1", "10 bytes"]);
    // Grey images for an RGB tokenizer are replicated: accepted, one input per image.
    let rgb = Dvae::new(tiny_tokenizer(3), 0).unwrap();
    let grey_data = write_dataset(&dir.path().join("grey.beitds"), 2, 8, 1, None, None);
    assert_eq!(dataset_inputs(&grey_data, &rgb, 10).unwrap().len(), 2 * rgb.image_len());
    assert_eq!(dataset_inputs(&rgb_data, &rgb, 10).unwrap().len(), 3 * rgb.image_len());
}

// ---------------------------------------------------------------------------------------------
// The loader and dataset files.

fn loader_config(batch: usize) -> LoaderConfig {
    LoaderConfig::beit(batch, (8, 8), (4, 4), 1)
}

#[test]
fn loader_refuses_batch_zero_too_many_workers_and_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), 20, 8, 1, None, None);
    assert_names(&invalid(Loader::new(ds.clone(), loader_config(0))), &["batch size", "got 0"]);
    let many = LoaderConfig { workers: 20_000, ..loader_config(4) };
    assert_names(&invalid(Loader::new(ds.clone(), many)), &["20000 worker threads", &MAX_LOADER_WORKERS.to_string()]);
    let huge_side = LoaderConfig { image_size: (1 << 17, 8), ..loader_config(4) };
    assert_names(&invalid(Loader::new(ds.clone(), huge_side)), &["131072x8", "65536"]);
    // A prefetch this deep would allocate the channel's slots up front.
    let deep = LoaderConfig { prefetch: usize::MAX, ..loader_config(4) };
    assert_names(&invalid(Loader::new(ds.clone(), deep)), &["the loader", "prefetch 18446744073709551615"]);
    // Batches of 2048x2048 views: 16 MiB each per image, several in flight.
    let big = LoaderConfig { image_size: (2048, 2048), tokenizer_size: (8, 8), ..loader_config(16) };
    let m = with_budget(MemoryBudget::Bytes(64 * MIB), || invalid(Loader::new(ds.clone(), big)));
    assert_names(&m, &["batches of 16 images 2048x2048", "smaller batch"]);
    // What fits runs, and a batch larger than the dataset is sized by the dataset.
    let loader = Loader::new(ds.clone(), LoaderConfig { workers: 3, ..loader_config(1 << 40) }).unwrap();
    assert_eq!(loader.iter().unwrap().map(|b| b.len()).sum::<usize>(), 20);
}

#[test]
fn dataset_shapes_beyond_the_caps_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = |h: u32, c: u32| DatasetSpec {
        height: h,
        width: 4,
        channels: c,
        labels: false,
        masks: false,
        token_grid: None,
    };
    let create = |name: &str, spec: DatasetSpec| DatasetWriter::create(&dir.path().join(name), spec).map(|_| ());
    assert_names(&invalid(create("a", spec(70_000, 1))), &["70000x4x1", "65536"]);
    assert_names(&invalid(create("b", spec(4, 5000))), &["4x4x5000", "4096"]);
    // A header of zero images of 70000x65536x4096 passes the size checks (no bytes) but
    // describes images beyond the caps.
    let mut h = DatasetHeader {
        version: 1,
        header_size: 128,
        count: 0,
        height: 70_000,
        width: 65_536,
        channels: 4096,
        pixel_layout: 1,
        flags: 0,
        token_grid_h: 0,
        token_grid_w: 0,
        pixels: Default::default(),
        labels: Default::default(),
        masks: Default::default(),
        tokens: Default::default(),
    };
    h.pixels.offset = 128;
    let path = dir.path().join("wide.beitds");
    std::fs::write(&path, h.to_bytes()).unwrap();
    assert_names(&format_err(Dataset::open(&path)), &["70000x65536x4096", "65536 pixels a side"]);
}

#[test]
fn writer_plans_its_in_memory_sections() {
    let dir = tempfile::tempdir().unwrap();
    let spec = DatasetSpec { height: 64, width: 64, channels: 1, labels: true, masks: true, token_grid: None };
    let mut w = DatasetWriter::create(&dir.path().join("m.beitds"), spec).unwrap();
    // 100,000 masks of 64x64 are 410 MB kept until finish.
    let m = with_budget(MemoryBudget::Bytes(64 * MIB), || invalid(w.reserve(100_000)));
    assert_names(&m, &["100000 samples", "kept in memory", "several smaller files"]);
    let m = invalid(w.reserve(usize::MAX / 2));
    assert_names(&m, &["larger than 2^64 bytes"]);
    w.reserve(10).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Importers.

fn idx_file(path: &Path, n: u32, rows: u32, cols: u32, body: usize) {
    let mut b = 0x0000_0803u32.to_be_bytes().to_vec();
    for v in [n, rows, cols] {
        b.extend(v.to_be_bytes());
    }
    b.extend(vec![7u8; body]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn importers_refuse_output_sizes_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images.idx");
    idx_file(&images, 2, 4, 4, 32);
    let out = dir.path().join("out.beitds");
    let m = invalid(import_idx_padded(&images, None, &out, Some((100_000, 100_000))));
    assert_names(&m, &["--pad 100000x100000", "65536"]);
    assert!(!out.exists());
    // A 60000x60000 canvas passes the side cap; its 3.4 GB do not pass a 64 MiB budget.
    let m = with_budget(MemoryBudget::Bytes(64 * MIB), || {
        invalid(import_idx_padded(&images, None, &out, Some((60_000, 60_000))))
    });
    assert_names(&m, &["60000x60000 padded image"]);
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    // An IDX header declaring 1 M images of 1000x1000 (the file has 32 bytes of them): a raw
    // file is truncated, a gzip stream's size is unknown until read, so the declared size is
    // tested against the budget before anything is read.
    let liar = dir.path().join("liar.idx");
    idx_file(&liar, 1_000_000, 1000, 1000, 32);
    assert_names(&format_err(read_idx_images(&liar)), &["truncated", "1000000000000 bytes of pixels"]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &std::fs::read(&liar).unwrap()).unwrap();
    std::fs::write(&liar, gz.finish().unwrap()).unwrap();
    let m = with_budget(MemoryBudget::Bytes(64 * MIB), || invalid(read_idx_images(&liar)));
    assert_names(&m, &["1000000 IDX images of 1000x1000", "several smaller"]);

    // npy: zero images, each declared 70000x70000: nothing to read, but not a dataset shape.
    let npy = dir.path().join("wide.npy");
    let mut text = "{'descr': '|u1', 'fortran_order': False, 'shape': (0, 70000, 70000), }".to_string();
    while (10 + text.len() + 1) % 64 != 0 {
        text.push(' ');
    }
    text.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((text.len() as u16).to_le_bytes());
    bytes.extend(text.as_bytes());
    std::fs::write(&npy, bytes).unwrap();
    assert_names(&format_err(import_npy(&npy, None, &out)), &["70000x70000x1", "65536"]);
    assert!(!out.exists());

    // Image folders: the output size is checked before any folder is read.
    let m = invalid(import_image_folder(&dir.path().join("none"), 100_000, 32, 3, &out));
    assert_names(&m, &["image size 100000x32", "65536"]);
}

// ---------------------------------------------------------------------------------------------
// Class counts, evaluation and classification fine-tuning.

fn tiny_classifier(num_labels: usize) -> Model {
    let cfg = BeitConfig::from_json_str(
        r#"{"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
            "image_size": 8, "patch_size": 4, "num_channels": 1}"#,
    )
    .unwrap();
    let cfg = classification_config(&cfg, num_labels, 0.0).unwrap();
    Model::new_random(cfg, Architecture::ImageClassification, 0).unwrap()
}

#[test]
fn a_hostile_label_does_not_become_a_class_count() {
    assert_eq!(num_labels_from_data(&[0, 4, 2]).unwrap(), 5);
    let m = invalid(num_labels_from_data(&[0, 4_000_000_000, 2]));
    assert_names(&m, &["sample 1", "label 4000000000", &MAX_LABELS.to_string()]);
    assert_names(&invalid(num_labels_from_data(&[])), &["no labels"]);
    let cfg = BeitConfig::default();
    assert_names(&invalid(classification_config(&cfg, 4_000_000_000, 0.0)), &["num_labels", "4000000000"]);
    assert_names(&invalid(classification_config(&cfg, 0, 0.0)), &["num_labels", "got 0"]);
    assert_names(&invalid(from_pretrained_backbone(&tiny_classifier(2), 0, 0)), &["num_labels", "got 0"]);
}

#[test]
fn steps_per_epoch_refuses_batch_zero() {
    assert_eq!(steps_per_epoch(10, 3).unwrap(), 3);
    assert_eq!(steps_per_epoch(2, 8).unwrap(), 1);
    assert_names(&invalid(steps_per_epoch(10, 0)), &["batch size", "got 0"]);
    assert_names(&invalid(steps_per_epoch(0, 4)), &["no samples"]);
    assert_eq!(total_steps(10, 3, 4, None).unwrap(), 12);
    assert_eq!(total_steps(10, 3, 4, Some(7)).unwrap(), 7);
    assert_names(&invalid(total_steps(10, 1, u64::MAX, None)), &["18446744073709551615 epochs"]);
    assert_names(&invalid(total_steps(10, 3, 0, None)), &["at least one step"]);
    assert_names(&invalid(total_steps(10, 0, 1, Some(5))), &["got 0"]);
}

#[test]
fn evaluation_refuses_batch_zero_foreign_labels_and_an_oversized_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let labels = |i: usize| if i == 3 { 7 } else { (i % 3) as u32 };
    let ds = write_dataset(&dir.path().join("e.beitds"), 6, 8, 1, Some(&labels), None);
    let model = tiny_classifier(3);
    assert_names(&invalid(evaluate(&model, &ds, 0, |_, _| {})), &["batch size", "got 0"]);
    let mut seen = 0;
    let m = invalid(evaluate(&model, &ds, 2, |_, _| seen += 1));
    assert_names(&m, &["sample 3 has label 7", "3 labels"]);
    assert_eq!(seen, 0, "refused before the first batch");
    // 200,000 labels: a 320 GB confusion matrix.
    let wide = tiny_classifier(200_000);
    let ok = write_dataset(&dir.path().join("ok.beitds"), 2, 8, 1, Some(&|i| i as u32), None);
    let m = with_budget(MemoryBudget::Bytes(1 << 30), || invalid(evaluate(&wide, &ok, 2, |_, _| {})));
    assert_names(&m, &["200000x200000 confusion matrix"]);
    assert!(evaluate(&model, &ok, 2, |_, _| {}).is_ok());
}

#[test]
fn classification_finetuning_refuses_bad_options_and_labels_before_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("f.beitds"), 8, 8, 1, Some(&|i| if i == 5 { 9 } else { 1 }), None);
    let options = TrainerOptions { total_steps: 4, ..TrainerOptions::default() };
    let mut trainer = Trainer::new_classifier(tiny_classifier(3), options).unwrap();
    let feed = FinetuneData {
        batch_size: 2,
        steps: 4,
        label_smoothing: 0.1,
        crop_scale: (0.5, 1.0),
        flip_prob: 0.5,
        seed: 0,
        workers: 1,
    };
    let run = |t: &mut Trainer, f: FinetuneData| run_finetune(t, ds.clone(), &f, |_| {});
    assert_names(&invalid(run(&mut trainer, FinetuneData { batch_size: 0, ..feed.clone() })), &["got 0"]);
    assert_names(&invalid(run(&mut trainer, FinetuneData { steps: 0, ..feed.clone() })), &["one step"]);
    let m = invalid(run(&mut trainer, FinetuneData { label_smoothing: 1.5, ..feed.clone() }));
    assert_names(&m, &["label smoothing", "1.5"]);
    let m = invalid(run(&mut trainer, FinetuneData { workers: 50_000, ..feed.clone() }));
    assert_names(&m, &["50000 worker threads"]);
    assert_names(&invalid(run(&mut trainer, feed.clone())), &["sample 5 has label 9", "3 labels"]);
    assert_eq!(trainer.step_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Segmentation fine-tuning and evaluation.

fn tiny_segmenter(num_labels: usize) -> Model {
    let cfg = BeitConfig::from_json_str(
        r#"{"image_size": 16, "patch_size": 4, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "use_relative_position_bias": true,
            "drop_path_rate": 0.0, "pool_scales": [1, 2], "auxiliary_channels": 8}"#,
    )
    .unwrap();
    Model::new_random(segmentation_config(cfg, num_labels), Architecture::SemanticSegmentation, 0).unwrap()
}

#[test]
fn segmentation_refuses_bad_normalisation_options_masks_and_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let mask = |i: usize| {
        let mut m = vec![(i % 3) as u8; 16 * 16];
        m[0] = 255; // the ignore index is fine
        if i == 4 {
            m[16 * 2 + 5] = 9;
        }
        m
    };
    let data = write_dataset(&dir.path().join("s.beitds"), 8, 16, 3, None, Some(&mask));
    let mut model = tiny_segmenter(3);
    let opts = SegFinetuneOptions { epochs: 1, batch_size: 2, ..SegFinetuneOptions::default() };
    let clean: Vec<usize> = vec![0, 1, 2, 3, 5, 6];
    let mut tune = |o: SegFinetuneOptions, ids: &[usize]| seg_finetune(&mut model, &data, ids, &o, |_| {}).map(|_| ());

    // The pretraining loader refuses a mean/std of another length; so does segmentation now.
    let m = invalid(tune(SegFinetuneOptions { mean: vec![0.5, 0.5], ..opts.clone() }, &clean));
    assert_names(&m, &["mean has 2 values", "3-channel"]);
    let m = invalid(tune(SegFinetuneOptions { std: vec![0.5, 0.5, 0.5, 0.5], ..opts.clone() }, &clean));
    assert_names(&m, &["std has 4 values"]);
    assert_names(&invalid(tune(SegFinetuneOptions { std: vec![0.0], ..opts.clone() }, &clean)), &["nonzero"]);
    assert_names(&invalid(tune(SegFinetuneOptions { mean: vec![f32::NAN], ..opts.clone() }, &clean)), &["NaN"]);
    assert_names(&invalid(tune(SegFinetuneOptions { epochs: 0, ..opts.clone() }, &clean)), &["epoch", "got 0"]);
    assert_names(&invalid(tune(SegFinetuneOptions { batch_size: 0, ..opts.clone() }, &clean)), &["got 0"]);
    assert_names(&invalid(tune(opts.clone(), &[0, 1, 99])), &["sample 99", "8 samples"]);
    let m = invalid(tune(opts.clone(), &[0, 4, 5]));
    assert_names(&m, &["sample 4 has mask value 9 at pixel (2, 5)", "3 labels", "ignores 255"]);
    let m = with_budget(MemoryBudget::Bytes(MIB), || invalid(tune(opts.clone(), &clean)));
    assert_names(&m, &["segmentation head's training pass on a batch of 2 images", "smaller batch size"]);
    tune(opts.clone(), &clean).unwrap();

    let (mean, std) = (vec![0.5f32], vec![0.5f32]);
    assert_names(&invalid(seg_evaluate(&model, &data, &clean, 0, &mean, &std)), &["batch size", "got 0"]);
    assert_names(&invalid(seg_evaluate(&model, &data, &[4], 2, &mean, &std)), &["mask value 9"]);
    let m = invalid(seg_evaluate(&model, &data, &clean, 2, &[0.1, 0.2], &std));
    assert_names(&m, &["mean has 2 values"]);
    let m = with_budget(MemoryBudget::Bytes(MIB / 4), || invalid(seg_evaluate(&model, &data, &clean, 4, &mean, &std)));
    assert_names(&m, &["evaluating a batch of 4 images"]);
    assert!(seg_evaluate(&model, &data, &clean, 4, &[0.4, 0.5, 0.6], &std).is_ok());
}

/// Run under an address-space limit by `loader_thread_start_failure_is_an_error`: with the
/// budget test lifted, the loader's 256 worker stacks cannot all be mapped.
#[test]
#[ignore = "run by loader_thread_start_failure_is_an_error under prlimit"]
fn loader_threads_under_an_address_space_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), 600, 8, 1, None, None);
    let config = LoaderConfig { workers: MAX_LOADER_WORKERS, prefetch: MAX_LOADER_WORKERS, ..loader_config(2) };
    if std::env::var_os("BEIT_MEASURE_ADDRESS_SPACE").is_some() {
        // The first, unlimited run: how much address space this process uses before the loader.
        println!("vm_kib: {}", vm_kib());
        return;
    }
    let loader = with_budget(MemoryBudget::Bytes(u64::MAX), || Loader::new(ds, config)).unwrap();
    let m = invalid(loader.iter().map(|it| it.len()));
    assert_names(&m, &["cannot start worker thread", "of 256", "fewer loader workers"]);
    println!("refused: {m}");
}

/// This process's address space (VmSize), in KiB.
fn vm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find(|l| l.starts_with("VmSize:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn loader_thread_start_failure_is_an_error() {
    if std::process::Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: no prlimit");
        return;
    }
    // The child's own address space is measured by running it once without a limit (this
    // process's would say nothing about it: other tests' threads and their malloc arenas count
    // here). One malloc arena keeps the two runs alike. The limit is that plus 200 MiB: room
    // for the test, not for 256 stacks of 2 MiB.
    let child = |limit: Option<u64>| {
        let mut cmd = match limit {
            Some(bytes) => {
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--as={bytes}")).arg(std::env::current_exe().unwrap());
                c
            }
            None => {
                let mut c = std::process::Command::new(std::env::current_exe().unwrap());
                c.env("BEIT_MEASURE_ADDRESS_SPACE", "1");
                c
            }
        };
        let out = cmd
            .env("MALLOC_ARENA_MAX", "1")
            .args(["--exact", "loader_threads_under_an_address_space_limit", "--ignored", "--nocapture"])
            .arg("--test-threads=1")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, text) = child(None);
    // libtest prints the test's name on the same line, before the test's own output.
    let measured: u64 = text
        .split("vm_kib: ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the measuring run printed no vm_kib (ok: {ok}): {text}"));
    let (ok, text) = child(Some(measured * 1024 + (200 << 20)));
    assert!(ok && text.contains("refused: loader: cannot start worker thread"), "{text}");
}
