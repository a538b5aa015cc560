//! The `.beitds` dataset format: writer -> reader round trips, the IDX importer, and corrupt
//! files (each must give an `Err` naming the problem, never a panic).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use beit::data::dataset::{Dataset, DatasetHeader, DatasetSpec, DatasetWriter};
use beit::data::import::{import_idx, import_idx_padded, read_idx_images, read_idx_labels};

fn pixel(i: usize, j: usize) -> u8 {
    (i.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8
}

/// Writes `n` samples of a 5x3x`c` dataset with the optional sections `spec` asks for.
fn write_sample_set(path: &Path, n: usize, spec: DatasetSpec) -> beit::data::dataset::DatasetHeader {
    let mut w = DatasetWriter::create(path, spec).unwrap();
    let (h, wd, c) = (spec.height as usize, spec.width as usize, spec.channels as usize);
    for i in 0..n {
        let px: Vec<u8> = (0..h * wd * c).map(|j| pixel(i, j)).collect();
        let mask: Vec<u8> = (0..h * wd).map(|j| ((i + j) % 5) as u8).collect();
        let toks: Vec<u16> = spec
            .token_grid
            .map(|(gh, gw)| (0..gh as usize * gw as usize).map(|j| (i * 1000 + j) as u16 + 60000).collect())
            .unwrap_or_default();
        w.push(
            &px,
            spec.labels.then_some(i as u32 * 3 + 100_000),
            spec.masks.then_some(&mask[..]),
            spec.token_grid.map(|_| &toks[..]),
        )
        .unwrap();
    }
    w.finish().unwrap()
}

fn check_sample_set(path: &Path, n: usize, spec: DatasetSpec) {
    let d = Dataset::open(path).unwrap();
    let (h, wd, c) = (spec.height as usize, spec.width as usize, spec.channels as usize);
    assert_eq!(d.len(), n);
    assert_eq!((d.header().height, d.header().width, d.header().channels), (spec.height, spec.width, spec.channels));
    assert_eq!(d.all_pixels().len(), n * h * wd * c);
    for i in 0..n {
        let px: Vec<u8> = (0..h * wd * c).map(|j| pixel(i, j)).collect();
        assert_eq!(d.pixels(i), &px[..], "pixels of sample {i}");
        assert_eq!(d.label(i), spec.labels.then_some(i as u32 * 3 + 100_000));
        let mask: Vec<u8> = (0..h * wd).map(|j| ((i + j) % 5) as u8).collect();
        assert_eq!(d.mask(i), spec.masks.then_some(&mask[..]));
        let toks: Option<Vec<u16>> = spec
            .token_grid
            .map(|(gh, gw)| (0..gh as usize * gw as usize).map(|j| (i * 1000 + j) as u16 + 60000).collect());
        assert_eq!(d.tokens(i), toks.as_deref());
        assert_eq!(d.tokens_le_bytes(i).map(|b| b.len()), toks.as_ref().map(|t| 2 * t.len()));
    }
    for s in [d.header().pixels, d.header().labels, d.header().masks, d.header().tokens] {
        assert_eq!(s.offset % DatasetHeader::SECTION_ALIGN, 0);
    }
}

fn spec(labels: bool, masks: bool, tokens: bool) -> DatasetSpec {
    DatasetSpec { height: 5, width: 3, channels: 3, labels, masks, token_grid: tokens.then_some((2, 3)) }
}

#[test]
fn round_trip_every_combination_of_optional_sections() {
    let dir = tempfile::tempdir().unwrap();
    for bits in 0..8 {
        let s = spec(bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
        for n in [0, 1, 7] {
            let path = dir.path().join(format!("set-{bits}-{n}.beitds"));
            let h = write_sample_set(&path, n, s);
            assert_eq!(h.count, n as u64);
            check_sample_set(&path, n, s);
        }
    }
    // Only the finished files are left: no temp files.
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| n.ends_with(".beitds") && !n.starts_with('.')), "{names:?}");
}

#[test]
fn writer_rejects_wrong_samples_and_drop_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.beitds");
    let mut w = DatasetWriter::create(&path, spec(true, true, true)).unwrap();
    let px = vec![0u8; 45];
    let mask = vec![0u8; 15];
    let toks = vec![0u16; 6];
    let err = |r: beit::Result<()>| r.unwrap_err().to_string();
    assert!(err(w.push(&px[..44], Some(1), Some(&mask), Some(&toks))).contains("pixel bytes"));
    assert!(err(w.push(&px, None, Some(&mask), Some(&toks))).contains("label missing"));
    assert!(err(w.push(&px, Some(1), None, Some(&toks))).contains("mask missing"));
    assert!(err(w.push(&px, Some(1), Some(&mask[..3]), Some(&toks))).contains("mask has 3 bytes"));
    assert!(err(w.push(&px, Some(1), Some(&mask), None)).contains("tokens missing"));
    assert!(err(w.push(&px, Some(1), Some(&mask), Some(&toks[..5]))).contains("5 tokens"));
    w.push(&px, Some(1), Some(&mask), Some(&toks)).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "an unfinished writer must leave nothing behind");

    let mut w = DatasetWriter::create(&path, spec(false, false, false)).unwrap();
    assert!(err(w.push(&px, Some(1), None, None)).contains("label given"));
    assert!(DatasetWriter::create(&path, DatasetSpec { height: 0, ..spec(false, false, false) }).is_err());
}

// ---------------------------------------------------------------------------------------------
// IDX import

fn idx_images(n: usize, h: usize, w: usize) -> (Vec<u8>, Vec<u8>) {
    let pixels: Vec<u8> = (0..n * h * w).map(|j| (j * 13 % 251) as u8).collect();
    let mut f = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        f.extend_from_slice(&(d as u32).to_be_bytes());
    }
    f.extend_from_slice(&pixels);
    (f, pixels)
}

fn idx_labels(n: usize) -> (Vec<u8>, Vec<u8>) {
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
    let mut f = vec![0, 0, 8, 1];
    f.extend_from_slice(&(n as u32).to_be_bytes());
    f.extend_from_slice(&labels);
    (f, labels)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn idx_import_raw_and_gzip_matches_source() {
    let dir = tempfile::tempdir().unwrap();
    let (n, h, w) = (37, 6, 4);
    let (img, pixels) = idx_images(n, h, w);
    let (lab, labels) = idx_labels(n);
    for gz in [false, true] {
        let enc = |b: &[u8]| if gz { gzip(b) } else { b.to_vec() };
        let ip = put(dir.path(), &format!("img-{gz}"), &enc(&img));
        let lp = put(dir.path(), &format!("lab-{gz}"), &enc(&lab));
        let out = dir.path().join(format!("out-{gz}.beitds"));
        let hdr = import_idx(&ip, Some(&lp), &out).unwrap();
        assert_eq!((hdr.count, hdr.height, hdr.width, hdr.channels), (n as u64, h as u32, w as u32, 1));
        let d = Dataset::open(&out).unwrap();
        assert_eq!(d.len(), n);
        assert_eq!(d.all_pixels(), &pixels[..]);
        for i in 0..n {
            assert_eq!(d.pixels(i), &pixels[i * h * w..(i + 1) * h * w]);
            assert_eq!(d.label(i), Some(labels[i] as u32));
            assert_eq!(d.mask(i), None);
            assert_eq!(d.tokens(i), None);
        }
        // Without labels.
        let out2 = dir.path().join(format!("nolabels-{gz}.beitds"));
        import_idx(&ip, None, &out2).unwrap();
        let d2 = Dataset::open(&out2).unwrap();
        assert_eq!(d2.all_pixels(), &pixels[..]);
        assert_eq!(d2.label(0), None);
    }
}

#[test]
fn idx_import_pads_onto_a_centred_zero_canvas() {
    let dir = tempfile::tempdir().unwrap();
    let (n, h, w) = (3, 2, 3);
    let (img, pixels) = idx_images(n, h, w);
    let (lab, labels) = idx_labels(n);
    let ip = put(dir.path(), "img", &img);
    let lp = put(dir.path(), "lab", &lab);
    let out = dir.path().join("padded.beitds");
    // 2x3 onto 5x6: one row above and two below (the odd one at the bottom), one column left
    // and two right.
    let hdr = import_idx_padded(&ip, Some(&lp), &out, Some((5, 6))).unwrap();
    assert_eq!((hdr.count, hdr.height, hdr.width), (n as u64, 5, 6));
    let d = Dataset::open(&out).unwrap();
    for i in 0..n {
        let src = &pixels[i * h * w..(i + 1) * h * w];
        let mut want = vec![0u8; 30];
        want[6 + 1..6 + 4].copy_from_slice(&src[..3]);
        want[12 + 1..12 + 4].copy_from_slice(&src[3..]);
        assert_eq!(d.pixels(i), &want[..], "image {i}");
        assert_eq!(d.label(i), Some(labels[i] as u32));
    }
    // Same size is the plain import; a smaller canvas is refused with the sizes in the message.
    let same = dir.path().join("same.beitds");
    import_idx_padded(&ip, None, &same, Some((2, 3))).unwrap();
    assert_eq!(Dataset::open(&same).unwrap().all_pixels(), &pixels[..]);
    let err = import_idx_padded(&ip, None, &dir.path().join("x.beitds"), Some((1, 3))).unwrap_err().to_string();
    assert!(err.contains("1x3") && err.contains("2x3"), "{err}");
}

#[test]
fn idx_import_rejects_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = idx_images(5, 4, 4);
    let (lab, _) = idx_labels(5);
    let (lab4, _) = idx_labels(4);
    let out = dir.path().join("out.beitds");
    let ip = put(dir.path(), "img", &img);
    let err = |images: &[u8], labels: &[u8]| {
        let ip = put(dir.path(), "i", images);
        let lp = put(dir.path(), "l", labels);
        import_idx(&ip, Some(&lp), &out).unwrap_err().to_string()
    };
    assert!(err(&img, &lab4).contains("has 4 labels but"), "{}", err(&img, &lab4));
    assert!(err(&lab, &lab).contains("bad IDX magic"));
    assert!(err(&img, &img).contains("bad IDX magic"));
    assert!(err(&img[..10], &lab).contains("truncated IDX header"));
    assert!(err(&img[..img.len() - 1], &lab).contains("truncated"));
    assert!(err(&[&img[..], &[0]].concat(), &lab).contains("trailing data"));
    assert!(err(&img, &lab[..lab.len() - 1]).contains("truncated"));
    assert!(err(&[], &lab).contains("truncated IDX header"));
    // A header claiming 2^32-1 images of 2^32-1 x 2^32-1 must fail cleanly, not allocate.
    let mut huge = vec![0, 0, 8, 3];
    huge.extend_from_slice(&[0xff; 12]);
    assert!(err(&huge, &lab).contains("overflows"));
    let mut big = vec![0, 0, 8, 3];
    big.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0]);
    assert!(err(&big, &lab).contains("truncated"));
    // Gzip: truncated stream.
    let gz = gzip(&img);
    let e = err(&gz[..gz.len() / 2], &lab);
    assert!(e.contains("truncated") || e.contains("corrupt gzip"), "{e}");
    assert!(!out.exists(), "failed imports must not leave an output file");
    let _ = ip;
}

fn fashion_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist")
}

/// Reads a gzipped IDX file with nothing from the importer: (dims, data).
fn direct_idx(path: &Path) -> (Vec<usize>, Vec<u8>) {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut bytes).unwrap();
    assert_eq!(&bytes[..3], &[0, 0, 8]);
    let nd = bytes[3] as usize;
    let dims: Vec<usize> =
        (0..nd).map(|k| u32::from_be_bytes(bytes[4 + 4 * k..8 + 4 * k].try_into().unwrap()) as usize).collect();
    (dims, bytes[4 + 4 * nd..].to_vec())
}

#[test]
#[ignore = "needs data/fashion-mnist (run scripts/fetch-fashion-mnist), then: cargo test --release --test dataset -- --ignored"]
fn fashion_mnist_train_import_matches_idx() {
    let dir = fashion_dir();
    let images = dir.join("train-images-idx3-ubyte.gz");
    let labels = dir.join("train-labels-idx1-ubyte.gz");
    assert!(images.exists() && labels.exists(), "{} missing: run scripts/fetch-fashion-mnist first", images.display());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("train.beitds");
    let start = std::time::Instant::now();
    import_idx(&images, Some(&labels), &out).unwrap();
    eprintln!("imported Fashion-MNIST train in {:.3} s", start.elapsed().as_secs_f64());
    let (idims, ipx) = direct_idx(&images);
    let (ldims, lab) = direct_idx(&labels);
    assert_eq!(idims, vec![60000, 28, 28]);
    assert_eq!(ldims, vec![60000]);
    let d = Dataset::open(&out).unwrap();
    assert_eq!(d.len(), 60000);
    assert_eq!((d.header().height, d.header().width, d.header().channels), (28, 28, 1));
    for i in 0..d.len() {
        assert_eq!(d.pixels(i), &ipx[i * 784..(i + 1) * 784], "pixels of image {i}");
        assert_eq!(d.label(i), Some(lab[i] as u32), "label of image {i}");
    }
    // Through the loader, with every augmentation turned into the identity (the whole image,
    // no flip, same size: the resampling filters are exact at integer positions), one epoch
    // gives every image once with its IDX pixels and label.
    let config = beit::data::loader::LoaderConfig {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        flip_prob: 0.0,
        mean: vec![0.0],
        std: vec![1.0],
        workers: 2,
        ..beit::data::loader::LoaderConfig::beit(1000, (28, 28), (4, 4), 16)
    };
    let loader = beit::data::loader::Loader::new(std::sync::Arc::new(Dataset::open(&out).unwrap()), config).unwrap();
    let mut seen = vec![false; 60000];
    for batch in loader.iter().unwrap() {
        for (k, &i) in batch.indices.iter().enumerate() {
            assert!(!seen[i], "image {i} twice in one epoch");
            seen[i] = true;
            let px: Vec<u8> = batch.view1[k * 784..(k + 1) * 784].iter().map(|v| (v * 255.0).round() as u8).collect();
            assert_eq!(px, &ipx[i * 784..(i + 1) * 784], "loader pixels of image {i}");
            assert_eq!(batch.labels.as_ref().unwrap()[k], lab[i] as u32, "loader label of image {i}");
        }
    }
    assert!(seen.iter().all(|&s| s), "the epoch missed images");
    // The importer's own readers agree too, and the labels are the 10 balanced classes.
    assert_eq!(read_idx_images(&images).unwrap().pixels, ipx);
    let l = read_idx_labels(&labels).unwrap();
    for c in 0..10u8 {
        assert_eq!(l.iter().filter(|&&v| v == c).count(), 6000);
    }
}

// ---------------------------------------------------------------------------------------------
// Corrupt files

/// A valid file with every section: returns its bytes.
fn full_file(dir: &Path) -> Vec<u8> {
    let p = dir.join("full.beitds");
    write_sample_set(&p, 4, spec(true, true, true));
    std::fs::read(p).unwrap()
}

fn open_err(dir: &Path, bytes: &[u8]) -> String {
    let p = dir.join("corrupt.beitds");
    std::fs::write(&p, bytes).unwrap();
    match Dataset::open(&p) {
        Ok(_) => panic!("a corrupt file of {} bytes opened without error", bytes.len()),
        Err(e) => {
            assert!(matches!(e, beit::Error::Format(_)), "{e:?}");
            e.to_string()
        }
    }
}

fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn set_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
/// Header position of section `i` (0 pixels, 1 labels, 2 masks, 3 tokens).
fn sec(i: usize) -> usize {
    56 + 16 * i
}

fn assert_contains(msg: String, want: &str) {
    assert!(msg.contains(want), "error {msg:?} does not mention {want:?}");
}

#[test]
fn corrupt_header_fields_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = full_file(dir.path());
    assert_eq!(&good[..8], &DatasetHeader::MAGIC);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        open_err(dir.path(), &b)
    };
    assert_contains(with(&|b| b[0] = b'X'), "bad magic");
    assert_contains(with(&|b| set_u32(b, 8, 2)), "unsupported dataset format version 2");
    assert_contains(with(&|b| set_u32(b, 8, 0)), "version 0");
    assert_contains(with(&|b| set_u32(b, 12, 256)), "header size 256");
    assert_contains(with(&|b| set_u32(b, 40, 0b1111)), "unknown section flags 0x8");
    assert_contains(with(&|b| set_u32(b, 40, 1 << 31)), "unknown section flags");
    assert_contains(with(&|b| set_u32(b, 36, 2)), "unknown pixel layout");
    assert_contains(with(&|b| set_u32(b, 24, 0)), "zero dimension");
    assert_contains(with(&|b| set_u32(b, 44, 0)), "token grid is 0x3");
    assert_contains(with(&|b| set_u32(b, 52, 1)), "reserved");
    assert_contains(with(&|b| set_u64(b, 120, 1)), "reserved");
    // Clearing a flag while its section is still described.
    assert_contains(with(&|b| set_u32(b, 40, 0b101)), "masks section is absent");
    // Wrong shape: the pixel length no longer equals count x H x W x C.
    assert_contains(with(&|b| set_u32(b, 28, 4)), "pixels section length");
    // Misaligned and overlapping sections.
    assert_contains(
        with(&|b| {
            let v = get_u64(b, sec(1));
            set_u64(b, sec(1), v + 4)
        }),
        "not 64-byte aligned",
    );
    assert_contains(with(&|b| set_u64(b, sec(1), 64)), "inside the header");
    assert_contains(
        with(&|b| {
            let v = get_u64(b, sec(0));
            set_u64(b, sec(2), v)
        }),
        "overlap",
    );
}

#[test]
fn huge_counts_and_overflowing_offsets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = full_file(dir.path());
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        open_err(dir.path(), &b)
    };
    // count x bytes per sample overflows u64.
    assert_contains(with(&|b| set_u64(b, 16, u64::MAX / 2)), "declared count or shape too large");
    assert_contains(with(&|b| set_u64(b, 16, u64::MAX)), "overflows");
    // A huge count whose sizes fit, with the section lengths patched to match: past the end.
    assert_contains(
        with(&|b| {
            let n = 1u64 << 40;
            set_u64(b, 16, n);
            for (i, per) in [(0, 45), (1, 4), (2, 15), (3, 12)] {
                set_u64(b, sec(i) + 8, n * per);
            }
        }),
        "runs past the end",
    );
    // A huge count with the old lengths: mismatch.
    assert_contains(with(&|b| set_u64(b, 16, 1 << 40)), "does not match count");
    // Huge image dimensions: H x W x C overflows u64; a huge H alone fits but mismatches.
    assert_contains(with(&|b| (24..36).for_each(|k| b[k] = 0xff)), "overflows");
    assert_contains(with(&|b| (24..28).for_each(|k| b[k] = 0xff)), "does not match count");
    // Offsets that overflow when the length is added (pixels: 180 bytes > 63), or that end just
    // short of 2^64 (the shorter sections): both must be caught.
    assert_contains(
        with(&|b| set_u64(b, sec(0), u64::MAX - 63)),
        "pixels section offset 18446744073709551552 + length 180 overflows",
    );
    for i in 0..4 {
        let msg = with(&|b| set_u64(b, sec(i), u64::MAX - 63));
        assert!(msg.contains("overflows") || msg.contains("runs past the end"), "{msg}");
    }
    // Offsets that point past the end of the file.
    for i in 0..4 {
        let msg = with(&|b| {
            let past = (b.len() as u64).next_multiple_of(64) + 64;
            set_u64(b, sec(i), past)
        });
        assert_contains(msg, "runs past the end");
    }
}

#[test]
fn truncation_anywhere_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = full_file(dir.path());
    assert_contains(open_err(dir.path(), &[]), "shorter than the 8-byte magic");
    assert_contains(open_err(dir.path(), &good[..5]), "shorter than the 8-byte magic");
    assert_contains(open_err(dir.path(), &good[..10]), "truncated header");
    for cut in [12, 20, 64, DatasetHeader::SIZE as usize - 1] {
        assert_contains(open_err(dir.path(), &good[..cut]), "truncated header");
    }
    let names = ["pixels", "labels", "masks", "tokens"];
    for (i, name) in names.iter().enumerate() {
        let off = get_u64(&good, sec(i)) as usize;
        let len = get_u64(&good, sec(i) + 8) as usize;
        for cut in [off, off + 1, off + len / 2, off + len - 1] {
            let msg = open_err(dir.path(), &good[..cut]);
            assert_contains(msg.clone(), "runs past the end");
            // The section cut is named (or, for a cut at an earlier section's end, an earlier one).
            assert!(names[..=i].iter().any(|n| msg.contains(n)), "{msg} should name {name}");
        }
    }
    // The last section ends exactly at the end of the file.
    let last = get_u64(&good, sec(3)) + get_u64(&good, sec(3) + 8);
    assert_eq!(last, good.len() as u64);
}

#[test]
fn random_header_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = full_file(dir.path());
    let p = dir.path().join("fuzz.beitds");
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut opened = 0;
    for _ in 0..2000 {
        let mut b = good.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % DatasetHeader::SIZE as u64) as usize;
            b[at] = next() as u8;
        }
        if next() % 4 == 0 {
            b.truncate((next() % good.len() as u64) as usize);
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok(d) = Dataset::open(&p) {
            // Whatever validated must be fully readable.
            opened += 1;
            for i in 0..d.len() {
                let _ = (d.pixels(i), d.label(i), d.mask(i), d.tokens(i));
            }
        }
    }
    assert!(opened < 2000);
}

/// `write_combined` copies exactly the chosen samples, in order, keeps the sections every input
/// has and reports the others; `beit dataset combine` selects a file's train or test split as
/// the segmentation fine-tune defines it.
#[test]
fn combine_copies_the_chosen_samples_and_drops_sections_not_all_inputs_have() {
    use beit::data::subset::{split_indices, write_combined};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.beitds"), dir.path().join("b.beitds"));
    write_sample_set(&a, 7, spec(true, true, true));
    write_sample_set(&b, 5, spec(true, true, false));
    let (da, db) = (Dataset::open(&a).unwrap(), Dataset::open(&b).unwrap());

    // A file with itself keeps every section, tokens included.
    let same = dir.path().join("same.beitds");
    let r = write_combined(&same, &[(&da, &[6, 0][..]), (&da, &[3][..])]).unwrap();
    assert!(r.dropped_sections.is_empty());
    let d = Dataset::open(&same).unwrap();
    assert_eq!(d.header().section_names(), ["pixels", "labels", "masks", "tokens"]);
    for (k, i) in [6, 0, 3].into_iter().enumerate() {
        assert_eq!(d.pixels(k), da.pixels(i));
        assert_eq!(d.label(k), da.label(i));
        assert_eq!(d.mask(k), da.mask(i));
        assert_eq!(d.tokens(k), da.tokens(i));
    }

    // b has no tokens: the union keeps labels and masks, drops tokens and says so.
    let mixed = dir.path().join("mixed.beitds");
    let r = write_combined(&mixed, &[(&da, &[5, 1][..]), (&db, &[0, 1, 2, 3, 4][..])]).unwrap();
    assert_eq!(r.dropped_sections, ["tokens"]);
    let d = Dataset::open(&mixed).unwrap();
    assert_eq!(d.len(), 7);
    assert_eq!(d.header().section_names(), ["pixels", "labels", "masks"]);
    let sources: Vec<(&Dataset, usize)> = vec![(&da, 5), (&da, 1), (&db, 0), (&db, 1), (&db, 2), (&db, 3), (&db, 4)];
    for (k, (src, i)) in sources.into_iter().enumerate() {
        assert_eq!(d.pixels(k), src.pixels(i), "sample {k}");
        assert_eq!((d.label(k), d.mask(k)), (src.label(i), src.mask(i)), "sample {k}");
    }

    // Bad selections are errors and leave no file behind.
    let bad = dir.path().join("bad.beitds");
    let err = |r: beit::Result<beit::data::subset::Combined>| r.unwrap_err().to_string();
    assert!(err(write_combined(&bad, &[(&da, &[7][..])])).contains("sample 7"));
    assert!(err(write_combined(&bad, &[(&da, &[][..])])).contains("empty"));
    assert!(err(write_combined(&bad, &[])).contains("no input"));
    let other = dir.path().join("other.beitds");
    write_sample_set(&other, 2, DatasetSpec { height: 4, ..spec(true, true, false) });
    let dother = Dataset::open(&other).unwrap();
    assert!(err(write_combined(&bad, &[(&da, &[0][..]), (&dother, &[0][..])])).contains("one shape"));
    assert!(!bad.exists());

    // The command line: b whole, then a's train split (test fraction 0.3, seed 4).
    let cli = dir.path().join("cli.beitds");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["dataset", "combine", "--test-fraction", "0.3", "--split-seed", "4", "--out"])
        .arg(&cli)
        .arg(&b)
        .arg(format!("{}:train", a.display()))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (train, test) = split_indices(7, 0.3, 4).unwrap();
    assert_eq!((train.len(), test.len()), (5, 2));
    let d = Dataset::open(&cli).unwrap();
    assert_eq!(d.len(), 5 + train.len());
    for k in 0..5 {
        assert_eq!(d.pixels(k), db.pixels(k));
    }
    for (k, &i) in train.iter().enumerate() {
        assert_eq!(d.pixels(5 + k), da.pixels(i), "train sample {i}");
    }
    let json = String::from_utf8(run.stdout).unwrap();
    assert!(json.contains(r#""dropped_sections":["tokens"]"#), "{json}");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["dataset", "combine", "--test-fraction", "1.5", "--out"])
        .arg(&bad)
        .arg(&a)
        .output()
        .unwrap();
    assert!(!run.status.success() && String::from_utf8_lossy(&run.stderr).contains("--test-fraction"));
}
