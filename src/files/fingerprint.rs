//! A cheap identity of a file's content, for telling that another file now stands at a path a
//! checkpoint recorded (a dataset regenerated, a tokenizer retrained).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::{Error, Result};

/// Bytes hashed at the start and at the end of the file (headers: a dataset's or safetensors').
const EDGE_BYTES: u64 = 64 << 10;
/// Blocks hashed evenly between the start and the end, and their size.
const SAMPLES: u64 = 32;
const SAMPLE_BYTES: u64 = 4 << 10;

/// FNV-1a, 64 bit: stable across builds and platforms (std's hasher is not), and plenty for
/// telling files apart (this is not a defence against someone forging a collision).
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The file's size and a hash of its first and last 64 KiB and of 32 blocks of 4 KiB spread
/// evenly between, as `SIZE:HASH`: at most about 256 KiB read, whatever the size. Another file
/// (other samples, other weights, another header) gets another fingerprint; an edit of a few
/// bytes inside a large file may not.
pub fn fingerprint(path: &Path) -> Result<String> {
    let io = |e: std::io::Error| Error::Io(format!("cannot read {}: {e}", path.display()));
    let mut file = fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut hash = Fnv1a::new();
    hash.update(&size.to_le_bytes());
    let mut ranges = vec![(0, EDGE_BYTES.min(size))];
    if size > 2 * EDGE_BYTES {
        let span = size - 2 * EDGE_BYTES;
        ranges.extend((0..SAMPLES).map(|i| (EDGE_BYTES + span * i / SAMPLES, SAMPLE_BYTES.min(span))));
    }
    if size > EDGE_BYTES {
        let start = size.saturating_sub(EDGE_BYTES).max(EDGE_BYTES);
        ranges.push((start, size - start));
    }
    let mut buf = Vec::new();
    for (offset, len) in ranges {
        buf.resize(len as usize, 0);
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        file.read_exact(&mut buf).map_err(io)?;
        hash.update(&buf);
    }
    Ok(format!("{size}:{:016x}", hash.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_files_apart_and_are_stable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        for size in [0usize, 10, 100 << 10, 1 << 20] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            fs::write(&p, &data).unwrap();
            let a = fingerprint(&p).unwrap();
            assert_eq!(a, fingerprint(&p).unwrap());
            assert!(a.starts_with(&format!("{size}:")));
            if size > 0 {
                let mut other = data.clone();
                other[0] ^= 1;
                fs::write(&p, &other).unwrap();
                assert_ne!(fingerprint(&p).unwrap(), a, "size {size}: first byte");
                let mut other = data.clone();
                *other.last_mut().unwrap() ^= 1;
                fs::write(&p, &other).unwrap();
                assert_ne!(fingerprint(&p).unwrap(), a, "size {size}: last byte");
            }
        }
        // A known value: the empty file (guards against an accidental change of the scheme,
        // which would make every recorded checkpoint look like another run's).
        fs::write(&p, b"").unwrap();
        assert_eq!(fingerprint(&p).unwrap(), "0:a8c7f832281a39c5");
    }
}
