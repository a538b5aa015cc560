//! The `safetensors_header` fuzz target's checks (fuzz/src/safetensors_bytes.rs) over
//! deterministic inputs, so that `cargo test` runs them without nightly or libFuzzer: random
//! bytes shaped like a safetensors file, and mutations of valid files (a model's weights, a
//! trainer checkpoint, a tokenizer's weights): numbers in the header (shapes, offsets) set to
//! edge values, dtypes swapped, the header length set to edge values, truncations, NaN written
//! over data, and a checkpoint's metadata (its model config, options and counters) given edge
//! values with its tensors left valid. Each input is read as all three kinds of file, by the Rust
//! API and the C API: nothing may panic, abort, hang, return an internal error, load a
//! non-finite weight, or change a trainer that refused a checkpoint.
//!
//! `BEIT_FUZZ_SEED_DIR=DIR` also writes the valid files into DIR: how
//! fuzz/seeds/safetensors_header/ was made.

#[path = "../fuzz/src/safetensors_bytes.rs"]
mod safetensors_bytes;

use safetensors_bytes::Scratch;
use serde_json::{json, Value};

#[path = "fuzz_replay/rng.rs"]
mod rng;
use rng::Rng;

fn seeds(dir: &std::path::Path) -> Vec<Vec<u8>> {
    if let Some(out) = std::env::var_os("BEIT_FUZZ_SEED_DIR") {
        safetensors_bytes::write_seeds(std::path::Path::new(&out));
    }
    safetensors_bytes::write_seeds(&dir.join("seeds")).iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The header's byte range: after the 8-byte length, as long as it says (clamped to the file).
fn header_range(f: &[u8]) -> std::ops::Range<usize> {
    if f.len() < 8 {
        return 0..0;
    }
    let n = u64::from_le_bytes(f[..8].try_into().unwrap()).min(f.len() as u64 - 8) as usize;
    8..8 + n
}

const NUMBERS: [&str; 14] = [
    "0",
    "1",
    "7",
    "65536",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "16777216",
    "1048577",
    "1e300",
    "-1",
    "0.0",
    "99999999999999999999999",
];
const DTYPES: [&str; 9] = ["F32", "F16", "BF16", "F64", "U8", "I64", "BOOL", "F8_E4M3", "X"];
const HEADER_LENGTHS: [u64; 7] = [0, 1, 7, 8, 100_000_000, u64::MAX, 1 << 40];

/// A checkpoint's metadata (its model config, options and counters) with one value set to an
/// edge value, the tensors left valid: what a tampered or corrupt checkpoint claims.
fn mutate_checkpoint_metadata(rng: &mut Rng, f: &[u8]) -> Option<Vec<u8>> {
    let h = header_range(f);
    let mut header: Value = serde_json::from_slice(&f[h.clone()]).ok()?;
    let key = beit::train::checkpoint::META_KEY;
    let mut meta: Value = serde_json::from_str(header["__metadata__"][key].as_str()?).ok()?;
    let edges = [
        json!(0),
        json!(-1),
        json!(65536),
        json!(16_777_216),
        json!(4_294_967_296u64),
        json!(u64::MAX),
        json!(1e300),
        json!(f64::MIN_POSITIVE),
        json!("x"),
        Value::Null,
    ];
    let edge = edges[rng.below(edges.len())].clone();
    if rng.below(2) == 0 {
        let mut cfg: Value = serde_json::from_str(meta["config"].as_str()?).ok()?;
        let fields = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
            "num_channels",
            "initializer_range",
            "layer_norm_eps",
        ];
        cfg[fields[rng.below(fields.len())]] = edge;
        meta["config"] = cfg.to_string().into();
    } else {
        let fields = ["step", "optimizer_step", "data_position", "rng_stream", "rng_word_pos", "rng_seed", "version"];
        let field = fields[rng.below(fields.len())];
        meta[field] = edge;
        if let Some(options) = meta["options"].as_object_mut() {
            if rng.below(2) == 0 {
                let keys: Vec<String> = options.keys().cloned().collect();
                options.insert(keys[rng.below(keys.len())].clone(), edges[rng.below(edges.len())].clone());
            }
        }
    }
    header["__metadata__"][key] = meta.to_string().into();
    let mut text = header.to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out.extend(&f[h.end..]);
    Some(out)
}

fn mutate(rng: &mut Rng, file: &[u8]) -> Vec<u8> {
    let mut f = file.to_vec();
    if rng.below(3) == 0 {
        if let Some(g) = mutate_checkpoint_metadata(rng, &f) {
            return g;
        }
    }
    for _ in 0..1 + rng.below(3) {
        let h = header_range(&f);
        match rng.below(7) {
            // A run of digits in the header (a shape, an offset, a config value) to an edge value.
            0..=2 if !h.is_empty() => {
                let digits: Vec<usize> = h.clone().filter(|&i| f[i].is_ascii_digit()).collect();
                if digits.is_empty() {
                    continue;
                }
                let mut start = digits[rng.below(digits.len())];
                while start > h.start && f[start - 1].is_ascii_digit() {
                    start -= 1;
                }
                let mut end = start;
                while end < h.end && f[end].is_ascii_digit() {
                    end += 1;
                }
                let new = NUMBERS[rng.below(NUMBERS.len())].as_bytes();
                let delta = new.len() as i64 - (end - start) as i64;
                f.splice(start..end, new.iter().copied());
                // Keep the length field true, so the header still parses as far as the change.
                let len = (h.len() as i64 + delta) as u64;
                f[..8].copy_from_slice(&len.to_le_bytes());
            }
            // A dtype swapped.
            3 if !h.is_empty() => {
                let text = String::from_utf8_lossy(&f[h.clone()]).into_owned();
                if let Some(at) = text.find("\"F32\"") {
                    let new = format!("\"{}\"", DTYPES[rng.below(DTYPES.len())]);
                    let replaced = text[..at].to_string() + &new + &text[at + 5..];
                    let mut g = ((replaced.len()) as u64).to_le_bytes().to_vec();
                    g.extend(replaced.as_bytes());
                    g.extend(&f[h.end..]);
                    f = g;
                }
            }
            // The header length itself.
            4 if f.len() >= 8 => {
                let v = HEADER_LENGTHS[rng.below(HEADER_LENGTHS.len())];
                f[..8].copy_from_slice(&v.to_le_bytes());
            }
            // NaN over some data (after the header).
            5 if h.end + 4 <= f.len() => {
                let at = h.end + 4 * rng.below((f.len() - h.end) / 4);
                f[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            // Truncate.
            _ => f.truncate(rng.below(f.len() + 1)),
        }
    }
    f
}

#[test]
fn valid_files_load() {
    let dir = tempfile::tempdir().unwrap();
    let files = seeds(dir.path());
    let mut s = Scratch::new(&dir.path().join("scratch"));
    for f in &files {
        safetensors_bytes::check(f, &mut s);
    }
    // And they are what they claim: the checks reach the loaders' ends.
    let model_dir = dir.path().join("model");
    safetensors_bytes::valid_model().save(&model_dir).unwrap();
    std::fs::write(model_dir.join("model.safetensors"), &files[0]).unwrap();
    beit::Model::load(&model_dir).unwrap();
    std::fs::write(dir.path().join("c.safetensors"), &files[1]).unwrap();
    beit::train::trainer::Trainer::from_checkpoint(&dir.path().join("c.safetensors")).unwrap();
}

#[test]
fn random_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Scratch::new(dir.path());
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for n in 0..1500 {
        let len = rng.below(300);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half get a true header length and a JSON-looking header.
        if n % 2 == 0 && len > 10 {
            data[..8].copy_from_slice(&((len - 8) as u64).to_le_bytes());
            data[8] = b'{';
            data[len - 1] = b'}';
        }
        safetensors_bytes::check(&data, &mut s);
    }
}

#[test]
fn mutated_valid_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let files = seeds(dir.path());
    let mut s = Scratch::new(&dir.path().join("scratch"));
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for n in 0..3000 {
        let data = mutate(&mut rng, &files[n % files.len()]);
        safetensors_bytes::check(&data, &mut s);
    }
}
