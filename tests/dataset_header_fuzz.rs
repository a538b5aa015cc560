//! The `dataset_header` fuzz target's checks (fuzz/src/dataset_bytes.rs) over deterministic
//! inputs, so that `cargo test` runs them without nightly or libFuzzer: 10,000 random byte
//! strings, and mutations of valid files (flipped header bytes, header fields set to edge
//! values, truncations, extensions). Nothing may panic or return an internal error.

#[path = "../fuzz/src/dataset_bytes.rs"]
mod dataset_bytes;

use std::path::Path;

use beit::data::dataset::{DatasetSpec, DatasetWriter};

#[path = "fuzz_replay/rng.rs"]
mod rng;
use rng::Rng;

/// Valid files: with and without each optional section, with and without samples.
fn valid_files(dir: &Path) -> Vec<Vec<u8>> {
    let specs = [
        DatasetSpec { height: 2, width: 3, channels: 1, labels: true, masks: false, token_grid: None },
        DatasetSpec { height: 3, width: 2, channels: 3, labels: true, masks: true, token_grid: Some((2, 1)) },
        DatasetSpec { height: 1, width: 1, channels: 2, labels: false, masks: true, token_grid: Some((1, 3)) },
    ];
    let mut files = Vec::new();
    for (k, spec) in specs.into_iter().enumerate() {
        for count in [0usize, 1, 3] {
            let path = dir.join(format!("valid-{k}-{count}.beitds"));
            let mut w = DatasetWriter::create(&path, spec).unwrap();
            let (hw, c) = ((spec.height * spec.width) as usize, spec.channels as usize);
            let grid = spec.token_grid.map(|(a, b)| (a * b) as usize);
            for i in 0..count {
                let px: Vec<u8> = (0..hw * c).map(|j| (i * 31 + j) as u8).collect();
                let mask: Vec<u8> = (0..hw).map(|j| (i + j) as u8).collect();
                let toks: Vec<u16> = (0..grid.unwrap_or(0)).map(|j| (i * 100 + j) as u16).collect();
                w.push(&px, spec.labels.then_some(i as u32), spec.masks.then_some(&mask[..]), grid.map(|_| &toks[..]))
                    .unwrap();
            }
            w.finish().unwrap();
            files.push(std::fs::read(&path).unwrap());
        }
    }
    files
}

const EDGE_U64: [u64; 10] = [0, 1, 2, 63, 64, 128, 1 << 32, u64::MAX / 2, u64::MAX - 63, u64::MAX];

fn mutate(rng: &mut Rng, file: &[u8]) -> Vec<u8> {
    let mut f = file.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(5) {
            // Flip a header byte.
            0 => {
                let at = rng.below(f.len().min(128));
                f[at] ^= 1 << rng.below(8);
            }
            // A u32 field (offsets 8..52) to an edge value.
            1 => {
                let at = 8 + 4 * rng.below(11);
                let v = EDGE_U64[rng.below(EDGE_U64.len())] as u32;
                if let Some(field) = f.get_mut(at..at + 4) {
                    field.copy_from_slice(&v.to_le_bytes());
                }
            }
            // count or a section offset/length to an edge value.
            2 => {
                let at = [16, 56, 64, 72, 80, 88, 96, 104, 112][rng.below(9)];
                let v = EDGE_U64[rng.below(EDGE_U64.len())].wrapping_add(rng.below(3) as u64);
                if let Some(field) = f.get_mut(at..at + 8) {
                    field.copy_from_slice(&v.to_le_bytes());
                }
            }
            // Truncate.
            3 => f.truncate(rng.below(f.len() + 1)),
            // Extend with junk.
            _ => {
                let n = rng.below(200);
                f.extend((0..n).map(|_| rng.next() as u8));
            }
        }
        if f.is_empty() {
            break;
        }
    }
    f
}

#[test]
fn random_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("input.beitds");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let magic = *b"BEITDS\0\x01";
    for n in 0..10_000 {
        let len = rng.below(320);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half of them get the magic (and often version 1), to reach the later checks.
        if n % 2 == 0 && len >= 8 {
            data[..8].copy_from_slice(&magic);
            if len >= 12 && n % 4 == 0 {
                data[8..12].copy_from_slice(&1u32.to_le_bytes());
            }
        }
        dataset_bytes::check(&data, &scratch);
    }
}

#[test]
fn mutated_valid_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("input.beitds");
    let files = valid_files(dir.path());
    // `BEIT_FUZZ_SEED_DIR=DIR` also writes three of them (one per spec, with samples) into DIR:
    // how fuzz/seeds/dataset_header/ was made.
    if let Some(out) = std::env::var_os("BEIT_FUZZ_SEED_DIR") {
        std::fs::create_dir_all(&out).unwrap();
        for (k, f) in [(0, &files[2]), (1, &files[4]), (2, &files[8])] {
            std::fs::write(std::path::Path::new(&out).join(format!("valid-{k}.beitds")), f).unwrap();
        }
    }
    for f in &files {
        // The unmutated files are accepted by every reader.
        beit::data::dataset::DatasetHeader::parse(f, f.len() as u64, "valid").unwrap();
        dataset_bytes::check(f, &scratch);
    }
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for n in 0..10_000 {
        let data = mutate(&mut rng, &files[n % files.len()]);
        dataset_bytes::check(&data, &scratch);
    }
}
