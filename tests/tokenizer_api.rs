//! The tokenizer's C API (`beit_tokenizer_*`), called as C would: tokens equal PyTorch's for the
//! committed DALL-E-style reference encoder and `Dvae::tokenize` on mapped pixels; every bad
//! argument is refused with its status and a message, writing nothing; decode round trip on a
//! tokenizer with a decoder; concurrent use of one tokenizer.

use std::ffi::{CStr, CString};
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

use beit::dvae::{map_pixels, unmap_pixels, Dvae, DvaeConfig};
use beit::ffi::context::{beit_context, beit_context_create, beit_context_free, beit_context_options_default};
use beit::ffi::status::{beit_last_error_message, beit_status};
use beit::ffi::tokenizer::*;
use beit::model::io::{read_f32, read_i64, SafetensorsFile};

use beit_status::*;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_dvae/dalle_small")
}

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(beit_last_error_message()) }.to_str().unwrap().to_string()
}

fn context() -> *mut beit_context {
    let mut opts = beit_context_options_default();
    opts.num_threads = 2;
    let mut ctx = null_mut();
    assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, BEIT_OK, "{}", last_error());
    ctx
}

fn load(ctx: *const beit_context, dir: &Path) -> *mut beit_tokenizer {
    let c = CString::new(dir.to_str().unwrap()).unwrap();
    let mut t = null_mut();
    assert_eq!(unsafe { beit_tokenizer_load(ctx, c.as_ptr(), &mut t) }, BEIT_OK, "{}", last_error());
    assert!(!t.is_null());
    t
}

/// The reference's pixels (unmapped to [0, 1]) and PyTorch's tokens.
fn reference_io() -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let io = SafetensorsFile::open(&reference_dir().join("io.safetensors")).unwrap();
    let st = io.parse().unwrap();
    let (_, mapped) = read_f32(&st, "mapped_pixels").unwrap().unwrap();
    let (_, tokens) = read_i64(&st, "tokens").unwrap().unwrap();
    let plain = mapped.iter().map(|&x| (x - 0.1) / 0.8).collect();
    (plain, mapped, tokens)
}

fn tokenize(t: *const beit_tokenizer, px: &[f32], batch: usize, out: &mut [i64]) -> beit_status {
    unsafe { beit_tokenizer_tokenize(t, px.as_ptr(), px.len(), batch, out.as_mut_ptr(), out.len()) }
}

#[test]
fn reference_tokens_equal_pytorch_and_the_rust_api() {
    let ctx = context();
    let t = load(ctx, &reference_dir());
    // The tokenizer shares the context's pool: the handle may go first.
    unsafe { beit_context_free(ctx) };

    let mut info = beit_tokenizer_info_default();
    assert_eq!(unsafe { beit_tokenizer_get_info(t, &mut info) }, BEIT_OK);
    assert_eq!(info.struct_size, size_of::<beit_tokenizer_info>());
    assert_eq!((info.in_channels, info.image_size, info.vocab_size), (3, 32, 96));
    assert_eq!((info.grid_h, info.grid_w, info.tokens_per_image), (4, 4, 16));
    assert!(!info.has_decoder);

    let (plain, mapped, want) = reference_io();
    assert_eq!(want.len(), 4 * 16);
    let mut got = vec![-1i64; want.len()];
    assert_eq!(tokenize(t, &plain, 4, &mut got), BEIT_OK, "{}", last_error());
    assert_eq!(last_error(), "");
    assert_eq!(got, want, "tokens differ from PyTorch's");

    // The same as the Rust API on the mapped pixels the C API computes.
    let dvae = Dvae::load(&reference_dir()).unwrap();
    let remapped: Vec<f32> = plain.iter().map(|&x| map_pixels(x)).collect();
    let rust: Vec<i64> = dvae.tokenize(&remapped).unwrap().into_iter().map(i64::from).collect();
    assert_eq!(got, rust);
    let direct: Vec<i64> = dvae.tokenize(&mapped).unwrap().into_iter().map(i64::from).collect();
    assert_eq!(direct, want);

    // Each image alone gives its own tokens (batching changes nothing).
    let per = 3 * 32 * 32;
    for b in 0..4 {
        let mut one = [0i64; 16];
        assert_eq!(tokenize(t, &plain[b * per..(b + 1) * per], 1, &mut one), BEIT_OK);
        assert_eq!(one[..], want[b * 16..(b + 1) * 16]);
    }

    // Concurrent calls on one tokenizer agree.
    let shared = t as usize;
    let results: Vec<Vec<i64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let plain = &plain;
                s.spawn(move || {
                    let mut out = vec![0i64; 64];
                    assert_eq!(tokenize(shared as *const beit_tokenizer, plain, 4, &mut out), BEIT_OK);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|r| *r == want));

    // No decoder.
    let mut px = vec![7.0f32; per];
    let status = unsafe { beit_tokenizer_decode(t, want.as_ptr(), 16, 1, px.as_mut_ptr(), px.len()) };
    assert_eq!(status, BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("no decoder"), "{}", last_error());
    assert!(px.iter().all(|&v| v == 7.0));
    unsafe { beit_tokenizer_free(t) };
    unsafe { beit_tokenizer_free(null_mut()) };
}

#[test]
fn every_bad_argument_is_refused_and_nothing_is_written() {
    let ctx = context();
    let t = load(ctx, &reference_dir());
    let per = 3 * 32 * 32;
    let px = vec![0.5f32; 2 * per];
    let mut out = vec![-7i64; 32];
    let untouched = |out: &[i64]| out.iter().all(|&v| v == -7);

    // NULLs, each named.
    let st = unsafe { beit_tokenizer_tokenize(null(), px.as_ptr(), px.len(), 2, out.as_mut_ptr(), 32) };
    assert_eq!(st, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("tokenizer"));
    let st = unsafe { beit_tokenizer_tokenize(t, null(), px.len(), 2, out.as_mut_ptr(), 32) };
    assert_eq!(st, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("pixels"));
    let st = unsafe { beit_tokenizer_tokenize(t, px.as_ptr(), px.len(), 2, null_mut(), 32) };
    assert_eq!(st, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("tokens"));

    // Sizes.
    assert_eq!(tokenize(t, &px, 0, &mut out), BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("batch is 0"), "{}", last_error());
    assert_eq!(tokenize(t, &px[..2 * per - 1], 2, &mut out), BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains(&format!("pixels_len is {}", 2 * per - 1)), "{}", last_error());
    assert!(last_error().contains(&(2 * per).to_string()), "{}", last_error());
    assert_eq!(tokenize(t, &px, 1, &mut out), BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("pixels_len"), "{}", last_error());
    assert_eq!(tokenize(t, &px, 2, &mut out[..31]), BEIT_ERR_BUFFER_SIZE);
    assert!(last_error().contains("tokens_len is 31") && last_error().contains("32"), "{}", last_error());
    let mut long = vec![-7i64; 33];
    assert_eq!(tokenize(t, &px, 2, &mut long), BEIT_ERR_BUFFER_SIZE);
    assert!(untouched(&long));
    let st = unsafe { beit_tokenizer_tokenize(t, px.as_ptr(), usize::MAX, usize::MAX, out.as_mut_ptr(), 32) };
    assert_eq!(st, BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("fit in memory"), "{}", last_error());

    // Non-finite pixels.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut p = px.clone();
        p[per + 5] = bad;
        assert_eq!(tokenize(t, &p, 2, &mut out), BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains(&format!("pixels[{}]", per + 5)), "{}", last_error());
    }
    // Misaligned output.
    let mut raw = vec![0u8; 32 * 8 + 8];
    let mis = unsafe { raw.as_mut_ptr().add(1) } as *mut i64;
    let st = unsafe { beit_tokenizer_tokenize(t, px.as_ptr(), px.len(), 2, mis, 32) };
    assert_eq!(st, BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("aligned"));
    assert!(raw.iter().all(|&b| b == 0));
    assert!(untouched(&out));

    // Info.
    let mut info = beit_tokenizer_info_default();
    assert_eq!(unsafe { beit_tokenizer_get_info(null(), &mut info) }, BEIT_ERR_NULL_POINTER);
    assert_eq!(unsafe { beit_tokenizer_get_info(t, null_mut()) }, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("out"));
    info.struct_size = 8;
    assert_eq!(unsafe { beit_tokenizer_get_info(t, &mut info) }, BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("struct_size"));
    assert_eq!(info.in_channels, 0);
    // A larger struct (a newer header) is fine; only the known fields are written.
    #[repr(C)]
    struct Bigger {
        info: beit_tokenizer_info,
        extra: u64,
    }
    let mut big = Bigger { info: beit_tokenizer_info_default(), extra: 0xdead };
    big.info.struct_size = size_of::<Bigger>();
    let st = unsafe { beit_tokenizer_get_info(t, &mut big.info) };
    assert_eq!(st, BEIT_OK);
    assert_eq!((big.info.struct_size, big.info.vocab_size, big.extra), (size_of::<Bigger>(), 96, 0xdead));

    // Load.
    let dir = CString::new(reference_dir().to_str().unwrap()).unwrap();
    let mut h = null_mut();
    assert_eq!(unsafe { beit_tokenizer_load(null(), dir.as_ptr(), &mut h) }, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("ctx"));
    assert_eq!(unsafe { beit_tokenizer_load(ctx, null(), &mut h) }, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("dir"));
    assert_eq!(unsafe { beit_tokenizer_load(ctx, dir.as_ptr(), null_mut()) }, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("out"));
    let missing = CString::new("/nonexistent/beit-tokenizer").unwrap();
    assert_eq!(unsafe { beit_tokenizer_load(ctx, missing.as_ptr(), &mut h) }, BEIT_ERR_IO);
    assert!(!last_error().is_empty());
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), "{not json").unwrap();
    let bad = CString::new(tmp.path().to_str().unwrap()).unwrap();
    assert_eq!(unsafe { beit_tokenizer_load(ctx, bad.as_ptr(), &mut h) }, BEIT_ERR_CONFIG, "{}", last_error());
    assert!(last_error().contains("config.json"), "{}", last_error());
    std::fs::copy(reference_dir().join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), b"\x08\0\0\0\0\0\0\0{}      ").unwrap();
    assert_eq!(unsafe { beit_tokenizer_load(ctx, bad.as_ptr(), &mut h) }, BEIT_ERR_FORMAT, "{}", last_error());
    assert!(h.is_null());

    unsafe {
        beit_tokenizer_free(t);
        beit_context_free(ctx);
    }
}

fn tiny_config() -> DvaeConfig {
    DvaeConfig {
        model_type: "beit-dvae".into(),
        in_channels: 1,
        image_size: 8,
        vocab_size: 12,
        n_hid: 8,
        group_count: 2,
        n_blk_per_group: 1,
        decoder_n_init: Some(8),
    }
}

#[test]
fn decode_round_trip_with_a_decoder() {
    let dir = tempfile::tempdir().unwrap();
    let dvae = Dvae::new(tiny_config(), 5).unwrap();
    dvae.save(dir.path()).unwrap();
    let ctx = context();
    let t = load(ctx, dir.path());
    let mut info = beit_tokenizer_info_default();
    assert_eq!(unsafe { beit_tokenizer_get_info(t, &mut info) }, BEIT_OK);
    assert!(info.has_decoder);
    let (p, per) = (info.tokens_per_image, 64);
    assert_eq!((info.grid_h, info.grid_w, p, info.vocab_size), (4, 4, 16, 12));

    let batch = 3;
    let plain: Vec<f32> = (0..batch * per).map(|i| 0.5 + 0.45 * (i as f32 * 0.37).sin()).collect();
    let mut tokens = vec![0i64; batch * p];
    assert_eq!(tokenize(t, &plain, batch, &mut tokens), BEIT_OK, "{}", last_error());
    assert!(tokens.iter().all(|&v| (0..12).contains(&v)));

    let mut px = vec![-1.0f32; batch * per];
    let st = unsafe { beit_tokenizer_decode(t, tokens.as_ptr(), tokens.len(), batch, px.as_mut_ptr(), px.len()) };
    assert_eq!(st, BEIT_OK, "{}", last_error());
    assert!(px.iter().all(|&v| (0.0..=1.0).contains(&v)));
    // Exactly unmap_pixels of the Rust decoder's output.
    let ids: Vec<u32> = tokens.iter().map(|&v| v as u32).collect();
    let want: Vec<f32> = dvae.decode(&ids).unwrap().into_iter().map(unmap_pixels).collect();
    assert_eq!(px, want);
    // Decoding then tokenizing is deterministic: the same tokens give the same pixels and the
    // decoded images tokenize to valid tokens.
    let mut again = vec![0i64; batch * p];
    assert_eq!(tokenize(t, &px, batch, &mut again), BEIT_OK);
    assert!(again.iter().all(|&v| (0..12).contains(&v)));

    // Bad tokens and sizes write nothing.
    let mut out = vec![9.0f32; batch * per];
    let dec = |toks: &[i64], batch: usize, out: &mut [f32]| unsafe {
        beit_tokenizer_decode(t, toks.as_ptr(), toks.len(), batch, out.as_mut_ptr(), out.len())
    };
    for bad in [-1i64, 12, i64::MAX, i64::MIN] {
        let mut toks = tokens.clone();
        toks[20] = bad;
        assert_eq!(dec(&toks, batch, &mut out), BEIT_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("tokens[20]") && last_error().contains("[0, 12)"), "{}", last_error());
    }
    assert_eq!(dec(&tokens, 0, &mut out), BEIT_ERR_INVALID_ARGUMENT);
    assert_eq!(dec(&tokens[..47], batch, &mut out), BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("tokens_len is 47"), "{}", last_error());
    assert_eq!(dec(&tokens, batch, &mut out[..191]), BEIT_ERR_BUFFER_SIZE);
    assert!(last_error().contains("pixels_len is 191") && last_error().contains("192"), "{}", last_error());
    let st = unsafe { beit_tokenizer_decode(null(), tokens.as_ptr(), 48, batch, out.as_mut_ptr(), 192) };
    assert_eq!(st, BEIT_ERR_NULL_POINTER);
    let st = unsafe { beit_tokenizer_decode(t, null(), 48, batch, out.as_mut_ptr(), 192) };
    assert_eq!(st, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("tokens"));
    let st = unsafe { beit_tokenizer_decode(t, tokens.as_ptr(), 48, batch, null_mut(), 192) };
    assert_eq!(st, BEIT_ERR_NULL_POINTER);
    assert!(last_error().contains("pixels"));
    assert!(out.iter().all(|&v| v == 9.0));

    unsafe {
        beit_tokenizer_free(t);
        beit_context_free(ctx);
    }
}
