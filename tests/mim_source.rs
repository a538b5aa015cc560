//! Pretraining batches from a dataset: cached tokens follow the sample indices, on-the-fly tokens
//! equal the tokenizer on view 2, global positions cross epochs and resume exactly, the token
//! cache writer stores what the tokenizer says, and mismatches are errors.

use std::path::Path;
use std::sync::Arc;

use beit::data::dataset::{Dataset, DatasetSpec, DatasetWriter};
use beit::data::loader::{Loader, LoaderConfig};
use beit::data::mim_source::{DatasetMim, TokenSource};
use beit::data::token_cache::{tokenize_dataset, tokenizer_input};
use beit::dvae::{Dvae, DvaeConfig};

const N: usize = 21;
const S: usize = 16;

fn write_dataset(path: &Path, tokens: bool) -> Arc<Dataset> {
    let spec = DatasetSpec {
        height: S as u32,
        width: S as u32,
        channels: 1,
        labels: true,
        masks: false,
        token_grid: tokens.then_some((4, 4)),
    };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..N {
        let px: Vec<u8> = (0..S * S).map(|p| ((i * 11 + p * 7 + (p / S) * (p % S)) % 256) as u8).collect();
        let tok: Vec<u16> = (0..16).map(|t| (i * 16 + t) as u16).collect();
        w.push(&px, Some(i as u32), None, tokens.then_some(&tok[..])).unwrap();
    }
    w.finish().unwrap();
    Arc::new(Dataset::open(path).unwrap())
}

/// 16x16 input, patch 4 → 4x4 grid; tokenizer view 16x16; BEiT's crops and flips.
fn config() -> LoaderConfig {
    LoaderConfig { seed: 9, tokenizer_size: (S, S), drop_last: true, ..LoaderConfig::beit(4, (S, S), (4, 4), 5) }
}

/// What a token cache needs: view 1 the whole image.
fn cached_config() -> LoaderConfig {
    config().whole_images()
}

fn tokenizer() -> Arc<Dvae> {
    let cfg = DvaeConfig {
        model_type: "beit-dvae".into(),
        in_channels: 1,
        image_size: S,
        vocab_size: 40,
        n_hid: 8,
        group_count: 3,
        n_blk_per_group: 1,
        decoder_n_init: None,
    };
    Arc::new(Dvae::new(cfg, 1).unwrap())
}

#[test]
fn cached_tokens_follow_the_samples_and_positions_cross_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), true);
    let mut src = DatasetMim::new(ds.clone(), cached_config(), TokenSource::Cached).unwrap();
    assert_eq!(src.batches_per_epoch(), 5); // 21 // 4, the short batch dropped
    let loader = Loader::new(ds.clone(), cached_config()).unwrap();
    let sequential: Vec<_> = (0..12).map(|p| src.batch_at(p).unwrap()).collect();
    for (p, b) in sequential.iter().enumerate() {
        let (epoch, within) = (p as u64 / 5, p % 5);
        let want = loader.with_epoch(epoch).unwrap().batch(within);
        assert_eq!(b.pixels, want.view1, "position {p}");
        assert_eq!(b.bool_masked_pos, want.bool_masked_pos);
        let expected: Vec<i64> = want.indices.iter().flat_map(|&i| (0..16).map(move |t| (i * 16 + t) as i64)).collect();
        assert_eq!(b.labels, expected, "labels are the cached tokens of the batch's samples");
        // View 1 is each whole image, only normalised ((x/255 - 0.5)/0.5), so the tokens of its
        // patches are the cached ones.
        for (k, &i) in want.indices.iter().enumerate() {
            let whole: Vec<f32> = ds.pixels(i).iter().map(|&v| (v as f32 / 255.0 - 0.5) / 0.5).collect();
            let got = &b.pixels[k * S * S..(k + 1) * S * S];
            let worst = got.iter().zip(&whole).map(|(a, w)| (a - w).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "position {p}, sample {i}: view 1 is not the whole image ({worst})");
        }
    }
    // A fresh source started at any position (a resumed run) gives the same batches.
    for p in [0u64, 3, 5, 9, 11] {
        let mut fresh = DatasetMim::new(ds.clone(), cached_config(), TokenSource::Cached).unwrap();
        assert_eq!(fresh.batch_at(p).unwrap(), sequential[p as usize], "resumed at {p}");
    }
}

#[test]
fn augmented_tokens_are_the_tokenizer_on_view_2() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), false);
    let tok = tokenizer();
    let mut src = DatasetMim::new(ds.clone(), config(), TokenSource::Augmented(tok.clone())).unwrap();
    let loader = Loader::new(ds, config()).unwrap();
    for p in 0..3 {
        let b = src.batch_at(p).unwrap();
        let want = loader.batch(p as usize);
        let tokens: Vec<i64> = tok.tokenize(&want.view2).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(b.labels, tokens);
        assert!(b.labels.iter().all(|&t| (0..40).contains(&t)));
    }
}

#[test]
fn token_cache_stores_the_tokenizer_output() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_dataset(&dir.path().join("d.beitds"), false);
    let tok = tokenizer();
    let out = dir.path().join("cached.beitds");
    let mut seen = Vec::new();
    tokenize_dataset(&tok, &ds, &out, |n| seen.push(n)).unwrap();
    assert_eq!(seen.last(), Some(&N));
    let cached = Dataset::open(&out).unwrap();
    assert_eq!(cached.len(), N);
    for i in [0, 7, N - 1] {
        assert_eq!(cached.pixels(i), ds.pixels(i));
        assert_eq!(cached.label(i), ds.label(i));
        let input = tokenizer_input(ds.pixels(i), 1, S, S, &tok).unwrap();
        let want: Vec<u16> = tok.tokenize(&input).unwrap().into_iter().map(|t| t as u16).collect();
        assert_eq!(cached.tokens(i).unwrap(), &want[..]);
    }
    // And the cache feeds pretraining.
    let mut src = DatasetMim::new(Arc::new(cached), cached_config(), TokenSource::Cached).unwrap();
    assert_eq!(src.batch_at(0).unwrap().labels.len(), 4 * 16);
}

#[test]
fn mismatches_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let plain = write_dataset(&dir.path().join("plain.beitds"), false);
    let err = DatasetMim::new(plain.clone(), cached_config(), TokenSource::Cached).err().unwrap();
    assert!(err.to_string().contains("no token cache"), "{err}");
    // Model grid 8x8 (patch 2) against a 4x4 token cache.
    let cached = write_dataset(&dir.path().join("cached.beitds"), true);
    let grid8 = LoaderConfig { patch_size: (2, 2), ..config() };
    let err = DatasetMim::new(cached.clone(), grid8.clone().whole_images(), TokenSource::Cached).err().unwrap();
    assert!(err.to_string().contains("grid"), "{err}");
    // Cached tokens with crops, flips or jitter would pair patches with other patches' tokens.
    for augmenting in [
        config(),
        LoaderConfig { flip_prob: 0.5, ..cached_config() },
        LoaderConfig { scale: (0.5, 1.0), ..cached_config() },
        LoaderConfig { color_jitter: 0.4, ..cached_config() },
    ] {
        let err = DatasetMim::new(cached.clone(), augmenting, TokenSource::Cached).err().unwrap();
        assert!(err.to_string().contains("whole, unflipped images"), "{err}");
    }
    assert!(err.to_string().contains("grid"), "{err}");
    let err = DatasetMim::new(plain.clone(), grid8, TokenSource::Augmented(tokenizer())).err().unwrap();
    assert!(err.to_string().contains("grid"), "{err}");
    let small_view = LoaderConfig { tokenizer_size: (8, 8), ..config() };
    let err = DatasetMim::new(plain, small_view, TokenSource::Augmented(tokenizer())).err().unwrap();
    assert!(err.to_string().contains("tokenizer"), "{err}");
}
