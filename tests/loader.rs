//! The augmenting two-view loader: epoch coverage and order, determinism across worker counts,
//! resuming, and the transforms checked by hand.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use beit::data::dataset::{Dataset, DatasetSpec, DatasetWriter};
use beit::data::loader::{resample, Filter, Loader, LoaderConfig, MimBatchData};

const N: usize = 37;
const S: usize = 28;

/// Pixel (y, x) of grey sample `i`: distinct content per sample.
fn pixel(i: usize, y: usize, x: usize) -> u8 {
    ((i * 7 + y * 3 + x * 5 + (x * y) % 11) % 256) as u8
}

fn write_dataset(path: &Path, tokens: bool) -> Arc<Dataset> {
    let spec = DatasetSpec {
        height: S as u32,
        width: S as u32,
        channels: 1,
        labels: true,
        masks: false,
        token_grid: tokens.then_some((7, 7)),
    };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..N {
        let px: Vec<u8> = (0..S * S).map(|p| pixel(i, p / S, p % S)).collect();
        let tok: Vec<u16> = (0..49).map(|t| (i * 100 + t) as u16).collect();
        w.push(&px, Some(1000 + i as u32), None, tokens.then_some(&tok[..])).unwrap();
    }
    w.finish().unwrap();
    Arc::new(Dataset::open(path).unwrap())
}

fn config(batch: usize, workers: usize) -> LoaderConfig {
    // 28x28 output, patch 4 → 7x7 grid; tokenizer view 14x14.
    LoaderConfig { seed: 42, workers, ..LoaderConfig::beit(batch, (S, S), (4, 4), 16) }
}

fn collect(loader: &Loader) -> Vec<MimBatchData> {
    loader.iter().unwrap().collect()
}

#[test]
fn each_epoch_visits_every_sample_once_in_a_new_order() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), false);
    let loader = Loader::new(ds.clone(), config(8, 2)).unwrap();
    assert_eq!(loader.num_batches(), 5);
    let mut orders = Vec::new();
    for epoch in 0..3 {
        let l = loader.with_epoch(epoch).unwrap();
        let batches = collect(&l);
        assert_eq!(batches.len(), 5);
        assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![8, 8, 8, 8, 5]);
        let order: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(order.len(), N);
        assert_eq!(order.iter().copied().collect::<HashSet<_>>().len(), N);
        assert_eq!(order, l.order());
        // Labels follow the indices.
        for b in &batches {
            let labels = b.labels.as_ref().unwrap();
            assert_eq!(labels, &b.indices.iter().map(|&i| 1000 + i as u32).collect::<Vec<_>>());
            assert!(b.tokens.is_none());
            assert_eq!(b.view1.len(), b.len() * S * S);
            assert_eq!(b.view2.len(), b.len() * 14 * 14);
            assert_eq!(b.bool_masked_pos.len(), b.len() * 49);
        }
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1]);
    assert_ne!(orders[1], orders[2]);

    let dropped = Loader::new(ds, LoaderConfig { drop_last: true, ..config(8, 2) }).unwrap();
    assert_eq!(dropped.num_batches(), 4);
    assert_eq!(collect(&dropped).iter().map(|b| b.len()).sum::<usize>(), 32);
}

#[test]
fn batches_are_identical_for_any_worker_count_and_resume_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), true);
    let one = collect(&Loader::new(ds.clone(), config(6, 1)).unwrap());
    let four = collect(&Loader::new(ds.clone(), LoaderConfig { prefetch: 1, ..config(6, 4) }).unwrap());
    assert_eq!(one.len(), 7);
    assert_eq!(one, four);
    for (p, b) in one.iter().enumerate() {
        assert_eq!(b.position, p);
    }
    let loader = Loader::new(ds.clone(), config(6, 3)).unwrap();
    for k in [0, 1, 3, 6, 7] {
        let resumed: Vec<_> = loader.starting_at(k).unwrap().collect();
        assert_eq!(resumed, one[k..], "starting_at({k})");
    }
    // Stopping early (dropping the iterator mid-epoch) shuts the workers down.
    let mut it = loader.iter().unwrap();
    assert_eq!(it.next().as_ref(), Some(&one[0]));
    drop(it);
    // Cached tokens follow the indices.
    for b in &one {
        let tokens = b.tokens.as_ref().unwrap();
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(tokens[k * 49..(k + 1) * 49], (0..49).map(|t| (i * 100 + t) as i64).collect::<Vec<_>>());
        }
    }
    let owned = one[1].to_owned_mim_batch().unwrap();
    assert_eq!(owned.shape, [6, 1, S, S]);
    assert_eq!((owned.pixels.len(), owned.labels.len(), owned.bool_masked_pos.len()), (6 * S * S, 6 * 49, 6 * 49));
    // A different seed gives other augmentations.
    let other = collect(&Loader::new(ds, LoaderConfig { seed: 43, ..config(6, 1) }).unwrap());
    assert_ne!(one[0].view1, other[0].view1);
}

#[test]
fn masks_have_the_requested_count_or_fewer() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), false);
    for (masked, min_block) in [(1, 1), (8, 4), (8, 8), (16, 16), (24, 16), (40, 16)] {
        let cfg = LoaderConfig { masked_patches: masked, min_mask_block: min_block, ..config(16, 2) };
        let loader = Loader::new(ds.clone(), cfg).unwrap();
        let mut distinct = HashSet::new();
        for b in loader.iter().unwrap() {
            for m in b.bool_masked_pos.chunks(49) {
                assert!(m.iter().all(|&v| v <= 1));
                let count = m.iter().filter(|&&v| v == 1).count();
                assert!((1..=masked).contains(&count), "{count} masked of {masked}");
                distinct.insert(m.to_vec());
            }
        }
        if masked > 1 {
            assert!(distinct.len() > 10, "masks should differ between samples");
        }
    }
}

/// `masking: Random` (the ablation) masks exactly the requested count in every image, differently
/// per image, and the same for any worker count.
#[test]
fn random_masking_masks_exactly_the_count() {
    use beit::data::masking::MaskingStrategy;
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), false);
    for masked in [1, 16, 30] {
        let blocks = LoaderConfig { masked_patches: masked, min_mask_block: masked.min(16), ..config(16, 1) };
        let cfg = |workers| LoaderConfig { masking: MaskingStrategy::Random, workers, ..blocks.clone() };
        let batches = collect(&Loader::new(ds.clone(), cfg(1)).unwrap());
        let mut distinct = HashSet::new();
        for m in batches.iter().flat_map(|b| b.bool_masked_pos.chunks(49)) {
            assert_eq!(m.iter().map(|&v| v as usize).sum::<usize>(), masked);
            distinct.insert(m.to_vec());
        }
        assert!(distinct.len() > 20, "{} distinct masks of {N}", distinct.len());
        let again = collect(&Loader::new(ds.clone(), cfg(3)).unwrap());
        let masks = |bs: &[MimBatchData]| bs.iter().map(|b| b.bool_masked_pos.clone()).collect::<Vec<_>>();
        assert_eq!(masks(&batches), masks(&again));
        let blocks = collect(&Loader::new(ds.clone(), blocks).unwrap());
        if masked > 1 {
            assert_ne!(masks(&batches), masks(&blocks));
        }
    }
}

#[test]
fn full_crop_with_flip_mirrors_and_normalises() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), false);
    let cfg = LoaderConfig {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        flip_prob: 1.0,
        mean: vec![0.25],
        std: vec![0.5],
        ..config(4, 1)
    };
    let loader = Loader::new(ds.clone(), cfg.clone()).unwrap();
    let b = loader.batch(0);
    for (k, &i) in b.indices.iter().enumerate() {
        // Same size, full crop: view 1 is exactly the mirrored image, normalised by hand.
        for y in 0..S {
            for x in 0..S {
                let want = (pixel(i, y, S - 1 - x) as f32 / 255.0 - 0.25) / 0.5;
                let got = b.view1[k * S * S + y * S + x];
                assert!((got - want).abs() < 1e-5, "sample {i} ({y},{x}): {got} vs {want}");
            }
        }
        // View 2: the mirrored image resampled to 14x14 (Lanczos), then 0.8·x + 0.1.
        let img: Vec<f32> = (0..S * S).map(|p| pixel(i, p / S, S - 1 - p % S) as f32 / 255.0).collect();
        let small = resample(&img, 1, S, S, (0, 0, S, S), (14, 14), Filter::Lanczos, false);
        for (p, (&got, &x)) in b.view2[k * 196..(k + 1) * 196].iter().zip(&small).enumerate() {
            let want = 0.8 * x + 0.1;
            assert!((got - want).abs() < 1e-5, "view 2 of sample {i} at {p}: {got} vs {want}");
            assert!((0.1 - 1e-6..=0.9 + 1e-6).contains(&got));
        }
    }
    // Without the flip: the image itself.
    let plain = Loader::new(ds, LoaderConfig { flip_prob: 0.0, ..cfg }).unwrap().batch(0);
    let i = plain.indices[0];
    for p in 0..S * S {
        let want = (pixel(i, p / S, p % S) as f32 / 255.0 - 0.25) / 0.5;
        assert!((plain.view1[p] - want).abs() < 1e-5);
    }
}

#[test]
fn resample_keeps_constants_and_averages_when_halving() {
    let c = vec![0.4f32; 2 * 10 * 12];
    for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
        let out = resample(&c, 2, 10, 12, (1, 2, 8, 9), (5, 7), filter, false);
        assert_eq!(out.len(), 2 * 5 * 7);
        assert!(out.iter().all(|&v| (v - 0.4).abs() < 1e-6), "{filter:?}");
    }
    // Bilinear halving of a 1x4 row is the mean of pairs (PIL's antialiased triangle filter).
    let row = [0.0f32, 0.2, 0.6, 1.0];
    let out = resample(&row, 1, 1, 4, (0, 0, 1, 4), (1, 2), Filter::Bilinear, false);
    // Support 2 input pixels around centres 1 and 3: weights (1/4, 3/4, 3/4, 1/4)/2 clipped.
    let w0 = [0.75f32, 0.75, 0.25];
    let want0 = (w0[0] * 0.0 + w0[1] * 0.2 + w0[2] * 0.6) / w0.iter().sum::<f32>();
    let want1 = (0.25 * 0.2 + 0.75 * 0.6 + 0.75 * 1.0) / 1.75;
    assert!((out[0] - want0).abs() < 1e-6 && (out[1] - want1).abs() < 1e-6, "{out:?}");
    // Mirroring reverses a row.
    let m = resample(&row, 1, 1, 4, (0, 0, 1, 4), (1, 4), Filter::Bicubic, true);
    assert!(m.iter().zip(row.iter().rev()).all(|(a, b)| (a - b).abs() < 1e-6), "{m:?}");
}

#[test]
fn crop_stays_inside_the_scale_and_ratio_range() {
    use beit::data::loader::random_resized_crop_params;
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for _ in 0..1000 {
        let (t, l, h, w) = random_resized_crop_params(28, 28, (0.08, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert!(t + h <= 28 && l + w <= 28 && h > 0 && w > 0);
        let area = (h * w) as f64 / 784.0;
        assert!((0.05..=1.0).contains(&area), "{h}x{w}");
    }
}

#[test]
fn rejects_bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), true);
    let bad = [
        LoaderConfig { batch_size: 0, ..config(4, 1) },
        LoaderConfig { patch_size: (5, 5), ..config(4, 1) },
        LoaderConfig { masked_patches: 0, ..config(4, 1) },
        LoaderConfig { min_mask_block: 17, ..config(4, 1) },
        LoaderConfig { scale: (0.5, 0.2), ..config(4, 1) },
        LoaderConfig { mean: vec![0.5, 0.5], ..config(4, 1) },
        // Cached 7x7 token grid vs an 14x14 patch grid.
        LoaderConfig { patch_size: (2, 2), ..config(4, 1) },
    ];
    for cfg in bad {
        assert!(Loader::new(ds.clone(), cfg.clone()).is_err(), "{cfg:?}");
    }
}

#[test]
fn colour_data_is_normalised_per_channel_and_jittered_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rgb.beitds");
    let spec = DatasetSpec { height: 8, width: 8, channels: 3, labels: false, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(&path, spec).unwrap();
    let rgb = |i: usize, p: usize, c: usize| ((i * 31 + p * 3 + c * 80) % 256) as u8;
    for i in 0..5 {
        let px: Vec<u8> = (0..64 * 3).map(|k| rgb(i, k / 3, k % 3)).collect();
        w.push(&px, None, None, None).unwrap();
    }
    w.finish().unwrap();
    let ds = Arc::new(Dataset::open(&path).unwrap());
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let cfg = LoaderConfig {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        flip_prob: 0.0,
        mean: mean.to_vec(),
        std: std.to_vec(),
        ..LoaderConfig::beit(2, (8, 8), (2, 2), 4)
    };
    let b = Loader::new(ds.clone(), cfg.clone()).unwrap().batch(0);
    assert_eq!(b.channels, 3);
    assert!(b.labels.is_none());
    for (k, &i) in b.indices.iter().enumerate() {
        for c in 0..3 {
            for p in 0..64 {
                let want = (rgb(i, p, c) as f32 / 255.0 - mean[c]) / std[c];
                let got = b.view1[(k * 3 + c) * 64 + p];
                assert!((got - want).abs() < 1e-5, "sample {i} channel {c} pixel {p}: {got} vs {want}");
            }
        }
    }
    let jit = LoaderConfig { color_jitter: 0.4, ..cfg };
    let one: Vec<_> =
        Loader::new(ds.clone(), LoaderConfig { workers: 1, ..jit.clone() }).unwrap().iter().unwrap().collect();
    let three: Vec<_> = Loader::new(ds, LoaderConfig { workers: 3, ..jit }).unwrap().iter().unwrap().collect();
    assert_eq!(one, three);
    assert_ne!(one[0].view1, b.view1);
    for v in one.iter().flat_map(|b| b.view1.chunks(64).enumerate().map(|(c, p)| (c % 3, p.to_vec()))) {
        let (c, plane) = v;
        assert!(plane.iter().all(|&x| (-mean[c] / std[c] - 1e-5..=(1.0 - mean[c]) / std[c] + 1e-5).contains(&x)));
    }
}
