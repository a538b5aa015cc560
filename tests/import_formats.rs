//! The `.npy`, image-folder and emoji importers (docs/dataset-format.md). Valid inputs round-trip
//! to exact pixels, labels and masks; every corrupt input gives an `Err` naming the problem (never a
//! panic) and leaves no output file. The `.npy` reference files in tests/reference_npy/ were written
//! by NumPy itself (scripts/gen_npy_reference.py).

use std::fs;
use std::path::{Path, PathBuf};

use beit::data::dataset::Dataset;
use beit::data::import::images::over_black;
use beit::data::import::{classes_path, import_emoji, import_image_folder, import_npy};
use image::{GrayImage, Rgb, RgbImage, Rgba, RgbaImage};

fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_npy").join(name)
}

/// The pattern scripts/gen_npy_reference.py writes: sample i, flat element j.
fn pattern(i: usize, j: usize) -> u8 {
    ((i * 37 + j * 11) % 256) as u8
}

fn check_pattern(d: &Dataset, n: usize, h: u32, w: u32, c: u32) {
    assert_eq!(d.len(), n);
    assert_eq!((d.header().height, d.header().width, d.header().channels), (h, w, c));
    for i in 0..n {
        let want: Vec<u8> = (0..(h * w * c) as usize).map(|j| pattern(i, j)).collect();
        assert_eq!(d.pixels(i), &want[..], "sample {i}");
    }
}

fn labels(d: &Dataset) -> Vec<u32> {
    (0..d.len()).map(|i| d.label(i).unwrap()).collect()
}

/// A .npy file: magic, version, header length (2 bytes for v1, 4 otherwise), the header text
/// padded like NumPy (to a multiple of 64 with spaces and a newline), then `data`.
fn npy_bytes(version: (u8, u8), dict: &str, data: &[u8]) -> Vec<u8> {
    let len_bytes = if version.0 == 1 { 2 } else { 4 };
    let mut text = dict.to_string();
    while !(8 + len_bytes + text.len() + 1).is_multiple_of(64) {
        text.push(' ');
    }
    text.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend([version.0, version.1]);
    out.extend(&(text.len() as u32).to_le_bytes()[..len_bytes]);
    out.extend(text.as_bytes());
    out.extend(data);
    out
}

fn dict(descr: &str, fortran: bool, shape: &str) -> String {
    let f = if fortran { "True" } else { "False" };
    format!("{{'descr': '{descr}', 'fortran_order': {f}, 'shape': {shape}, }}")
}

fn u8_images(n: usize, h: usize, w: usize) -> Vec<u8> {
    npy_bytes((1, 0), &dict("|u1", false, &format!("({n}, {h}, {w})")), &vec![9u8; n * h * w])
}

#[test]
fn npy_reference_u8_grey_and_rgb_from_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grey.beitds");
    import_npy(&reference("grey_u8.npy"), Some(&reference("labels_u1.npy")), &out).unwrap();
    let d = Dataset::open(&out).unwrap();
    check_pattern(&d, 3, 4, 5, 1);
    assert_eq!(labels(&d), [2, 1, 0]);
    assert!(!d.header().has_masks());

    let out = dir.path().join("rgb.beitds");
    import_npy(&reference("rgb_u8_v2.npy"), None, &out).unwrap();
    let d = Dataset::open(&out).unwrap();
    check_pattern(&d, 2, 3, 4, 3);
    assert!(!d.header().has_labels());
}

#[test]
fn npy_reference_floats_and_label_dtypes_from_numpy() {
    let dir = tempfile::tempdir().unwrap();
    for (images, lab, want) in
        [("grey_f32.npy", "labels_i8.npy", [7, 0, 4_000_000_000]), ("grey_f64be_v3.npy", "labels_i4be.npy", [5, 6, 7])]
    {
        let out = dir.path().join(format!("{images}.beitds"));
        import_npy(&reference(images), Some(&reference(lab)), &out).unwrap();
        let d = Dataset::open(&out).unwrap();
        check_pattern(&d, 3, 4, 5, 1);
        assert_eq!(labels(&d), want, "{lab}");
    }
}

/// Imports and expects an error whose message contains `needle`; no output file may remain.
fn expect_err(images: &Path, labels: Option<&Path>, needle: &str) {
    let out = images.with_extension("beitds");
    let err = import_npy(images, labels, &out).expect_err(needle).to_string();
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!out.exists(), "{} left behind", out.display());
    let leftovers: Vec<_> = fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn npy_reference_rejections_from_numpy() {
    let grey = reference("grey_u8.npy");
    expect_err(&reference("fortran_u8.npy"), None, "Fortran");
    expect_err(&grey, Some(&reference("labels_negative.npy")), "label 1 is negative");
    expect_err(&reference("bool_images.npy"), None, "unsupported dtype");
    // 2 RGB images, 3 labels.
    expect_err(&reference("rgb_u8_v2.npy"), Some(&reference("labels_u1.npy")), "has 3 labels but");
}

#[test]
fn npy_own_writer_roundtrip_versions_and_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..2 * 2 * 3 * 4).map(|j| j as u8).collect();
    for version in [(1, 0), (2, 0), (3, 0)] {
        let p = dir.path().join(format!("v{}.npy", version.0));
        fs::write(&p, npy_bytes(version, &dict("|u1", false, "(2, 2, 3, 4)"), &data)).unwrap();
        let out = dir.path().join(format!("v{}.beitds", version.0));
        import_npy(&p, None, &out).unwrap();
        let d = Dataset::open(&out).unwrap();
        assert_eq!((d.len(), d.header().height, d.header().width, d.header().channels), (2, 2, 3, 4));
        assert_eq!(d.all_pixels(), &data[..]);
    }
    // Double-quoted keys, no trailing comma, other key order, N = 0.
    let p = dir.path().join("empty.npy");
    fs::write(&p, npy_bytes((1, 0), "{\"shape\": (0, 5, 6), \"descr\": \"|u1\", \"fortran_order\": False}", &[]))
        .unwrap();
    import_npy(&p, None, &dir.path().join("empty.beitds")).unwrap();
    assert_eq!(Dataset::open(&dir.path().join("empty.beitds")).unwrap().len(), 0);
    // Floats: rounding and tiny excursions clamp.
    let vals: [f32; 4] = [0.0, 1.0, 0.5 / 255.0 + 0.001, -0.001];
    let fdata: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = dir.path().join("f.npy");
    fs::write(&p, npy_bytes((1, 0), &dict("<f4", false, "(1, 2, 2)"), &fdata)).unwrap();
    import_npy(&p, None, &dir.path().join("f.beitds")).unwrap();
    assert_eq!(Dataset::open(&dir.path().join("f.beitds")).unwrap().pixels(0), [0, 255, 1, 0]);
}

#[test]
fn npy_corruptions_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut write = |bytes: &[u8]| {
        n += 1;
        let p = dir.path().join(format!("bad{n}.npy"));
        fs::write(&p, bytes).unwrap();
        p
    };
    let good = u8_images(2, 3, 4);
    let good_labels = npy_bytes((1, 0), &dict("<i8", false, "(2,)"), &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    let labels = write(&good_labels);
    import_npy(&write(&good), Some(&labels), &dir.path().join("good.beitds")).unwrap();

    let mut bad_magic = good.clone();
    bad_magic[1] = b'm';
    expect_err(&write(&bad_magic), None, "bad magic");
    expect_err(&write(b""), None, "bad magic");
    expect_err(&write(b"\x93NUMPY"), None, "no version");
    for v in [[4u8, 0], [1, 1], [0, 0]] {
        let mut b = good.clone();
        b[6..8].copy_from_slice(&v);
        expect_err(&write(&b), None, "unsupported .npy format version");
    }
    expect_err(&write(&good[..9]), None, "truncated .npy header length");
    expect_err(&write(&good[..40]), None, "truncated .npy header");
    let mut huge_len = good.clone();
    huge_len[8..10].copy_from_slice(&60000u16.to_le_bytes());
    expect_err(&write(&huge_len), None, "truncated .npy header");
    let mut v2_huge = npy_bytes((2, 0), &dict("|u1", false, "(2, 3, 4)"), &[0; 24]);
    v2_huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_err(&write(&v2_huge), None, "too large");
    expect_err(&write(&good[..good.len() - 1]), None, "truncated: shape [2, 3, 4]");
    let mut trailing = good.clone();
    trailing.push(0);
    expect_err(&write(&trailing), None, "1 trailing bytes");
    expect_err(&write(&npy_bytes((1, 0), &dict("|u1", true, "(2, 3, 4)"), &[0; 24])), None, "Fortran");
    for descr in ["<c8", "<f2", "|b1", "<U3", "|V4", "<u16", "u1", "<i3", "|O"] {
        let p = write(&npy_bytes((1, 0), &dict(descr, false, "(2, 3, 4)"), &[0; 24]));
        expect_err(&p, None, "unsupported");
    }
    // Integer images other than u1 are not images we accept.
    expect_err(&write(&npy_bytes((1, 0), &dict("<i4", false, "(1, 1, 1)"), &[0; 4])), None, "unsupported image dtype");
    let structured = "{'descr': [('a', '<i4')], 'fortran_order': False, 'shape': (2,), }";
    expect_err(&write(&npy_bytes((1, 0), structured, &[0; 8])), None, "structured");
    let big = "(1099511627776, 1099511627776, 1099511627776)";
    expect_err(&write(&npy_bytes((1, 0), &dict("|u1", false, big), &[])), None, "overflows");
    expect_err(&write(&npy_bytes((1, 0), &dict("<f8", false, "(4294967296, 4294967296)"), &[])), None, "overflows");
    expect_err(&write(&npy_bytes((1, 0), &dict("|u1", false, "(1, -3, 4)"), &[])), None, "non-negative");
    expect_err(&write(&npy_bytes((1, 0), &dict("|u1", false, "(0, 0, 4)"), &[])), None, "zero dimension");
    expect_err(&write(&npy_bytes((1, 0), &dict("|u1", false, "(6, 4)"), &[0; 24])), None, "[N, H, W]");
    expect_err(&write(&npy_bytes((1, 0), &dict("|u1", false, "(1, 1, 1, 1, 1)"), &[0])), None, "[N, H, W]");
    expect_err(&write(&npy_bytes((1, 0), &dict("|u1", false, "[2, 3, 4]"), &[0; 24])), None, "'shape'");
    let no_shape = "{'descr': '|u1', 'fortran_order': False, }";
    expect_err(&write(&npy_bytes((1, 0), no_shape, &[0; 24])), None, "no 'shape'");
    let extra = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4), 'x': 1, }";
    expect_err(&write(&npy_bytes((1, 0), extra, &[0; 24])), None, "unexpected key");
    let dup = "{'descr': '|u1', 'descr': '|u1', 'fortran_order': False, 'shape': (2, 3, 4), }";
    expect_err(&write(&npy_bytes((1, 0), dup, &[0; 24])), None, "repeats");
    for junk in
        ["", "{", "{'descr' '|u1'}", "{'descr': '|u1", "[]", "{} x", "{'a': ((((((((((((((((((((((((((((((((((1,)}"]
    {
        expect_err(&write(&npy_bytes((1, 0), junk, &[0; 24])), None, "bad .npy header");
    }
    // Floats out of range or NaN.
    for v in [2.0f32, -0.5, f32::NAN, 255.0] {
        let d = v.to_le_bytes();
        expect_err(&write(&npy_bytes((1, 0), &dict("<f4", false, "(1, 1, 1)"), &d)), None, "outside [0, 1]");
    }

    // Labels.
    let images = write(&good);
    let lab = |descr: &str, shape: &str, data: &[u8]| npy_bytes((1, 0), &dict(descr, false, shape), data);
    expect_err(&images, Some(&write(&lab("|u1", "(3,)", &[0, 1, 2]))), "has 3 labels but");
    expect_err(&images, Some(&write(&lab("|u1", "(1,)", &[0]))), "has 1 labels but");
    expect_err(&images, Some(&write(&lab("|i1", "(2,)", &[0, 0xff]))), "label 1 is negative (-1)");
    let neg64: Vec<u8> = [3i64, i64::MIN].iter().flat_map(|v| v.to_le_bytes()).collect();
    expect_err(&images, Some(&write(&lab("<i8", "(2,)", &neg64))), "negative");
    let big: Vec<u8> = [1u64 << 33, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    expect_err(&images, Some(&write(&lab("<u8", "(2,)", &big))), "does not fit u32");
    expect_err(&images, Some(&write(&lab("<f4", "(2,)", &[0; 8]))), "integer dtype");
    expect_err(&images, Some(&write(&lab("|u1", "(2, 1)", &[0; 2]))), "1-d");
    expect_err(&images, Some(&write(&lab("|u1", "(2,)", &[0; 3]))), "trailing");
    expect_err(&images, Some(&write(&lab("<u2", "(2,)", &[0; 3]))), "truncated");
    expect_err(&images, Some(&dir.path().join("missing.npy")), "cannot open");
}

#[test]
fn npy_random_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let base = u8_images(2, 3, 4);
    let p = dir.path().join("fuzz.npy");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..400 {
        let mut b = base.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let pos = (state % b.len() as u64) as usize;
            b[pos] = (state >> 32) as u8;
        }
        state ^= state << 13;
        b.truncate(b.len() - (state % 4) as usize);
        fs::write(&p, &b).unwrap();
        let _ = import_npy(&p, None, &dir.path().join("fuzz.beitds"));
    }
}

fn save_rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    let img = RgbImage::from_fn(w, h, |x, y| Rgb(f(x, y)));
    img.save(path).unwrap();
    img
}

fn classes_file(out: &Path) -> Vec<String> {
    serde_json::from_slice(&fs::read(classes_path(out)).unwrap()).unwrap()
}

#[test]
fn image_folder_labels_order_pixels_and_resize() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    for c in ["b_dogs", "a_cats", ".hidden"] {
        fs::create_dir_all(root.join(c)).unwrap();
    }
    fs::write(root.join("README.txt"), "ignored").unwrap();
    fs::write(root.join("a_cats/notes.txt"), "ignored").unwrap();
    // Written out of order: 2 before 1.
    let cat2 = save_rgb(&root.join("a_cats/2.png"), 4, 3, |x, y| [(x * 60) as u8, (y * 80) as u8, 200]);
    let cat1 = save_rgb(&root.join("a_cats/1.PNG"), 4, 3, |x, y| [10, (x + y) as u8, 255 - x as u8]);
    save_rgb(&root.join("b_dogs/dog.jpg"), 4, 3, |_, _| [200, 100, 50]);
    GrayImage::from_fn(4, 3, |x, y| image::Luma([(x * 10 + y) as u8])).save(root.join("b_dogs/grey.png")).unwrap();
    save_rgb(&root.join(".hidden/x.png"), 4, 3, |_, _| [0, 0, 0]);

    let out = dir.path().join("f.beitds");
    let (h, classes) = import_image_folder(&root, 3, 4, 3, &out).unwrap();
    assert_eq!(classes, ["a_cats", "b_dogs"]);
    assert_eq!(classes_file(&out), classes);
    assert_eq!(h.count, 4);
    let d = Dataset::open(&out).unwrap();
    assert_eq!((d.header().height, d.header().width, d.header().channels), (3, 4, 3));
    assert_eq!(labels(&d), [0, 0, 1, 1]);
    // "1.PNG" sorts before "2.png"; PNG pixels are exact.
    assert_eq!(d.pixels(0), cat1.as_raw().as_slice());
    assert_eq!(d.pixels(1), cat2.as_raw().as_slice());
    // JPEG is lossy: close to the flat colour.
    for px in d.pixels(2).chunks(3) {
        for (got, want) in px.iter().zip([200u8, 100, 50]) {
            assert!(got.abs_diff(want) <= 6, "jpeg pixel {px:?}");
        }
    }
    // Grey PNG into RGB: every channel the grey value.
    let g = d.pixels(3);
    for y in 0..3 {
        for x in 0..4 {
            let v = (x * 10 + y) as u8;
            assert_eq!(&g[(y * 4 + x) * 3..][..3], [v, v, v]);
        }
    }

    // Grey output and resize: 3x4 -> 6x8 (HxW); a flat image stays flat, a grey PNG keeps values.
    let out = dir.path().join("g.beitds");
    import_image_folder(&root, 6, 8, 1, &out).unwrap();
    let d = Dataset::open(&out).unwrap();
    assert_eq!((d.header().height, d.header().width, d.header().channels), (6, 8, 1));
    assert_eq!(d.pixels(0).len(), 48);
    let first = d.pixels(2)[0];
    assert!(d.pixels(2).iter().all(|&v| v.abs_diff(first) <= 3), "flat jpeg resized: {:?}", d.pixels(2));
    let gp = d.pixels(3);
    assert_eq!(gp.iter().min(), Some(&0));
    assert!(*gp.iter().max().unwrap() <= 32 && *gp.iter().max().unwrap() >= 28, "{gp:?}");
    // Square size and a shrink.
    let out = dir.path().join("s.beitds");
    import_image_folder(&root, 2, 2, 3, &out).unwrap();
    assert_eq!(Dataset::open(&out).unwrap().pixels(0).len(), 12);
}

#[test]
fn image_folder_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    let out = dir.path().join("f.beitds");
    let err = |root: &Path, ch: u32| import_image_folder(root, 4, 4, ch, &out).unwrap_err().to_string();
    assert!(err(&root, 3).contains("does not exist"));
    fs::create_dir_all(&root).unwrap();
    assert!(err(&root, 3).contains("no class sub-folders"));
    fs::create_dir_all(root.join("cls")).unwrap();
    assert!(err(&root, 3).contains("has no .png/.jpg/.jpeg files"));
    save_rgb(&root.join("cls/ok.png"), 2, 2, |_, _| [1, 2, 3]);
    assert!(err(&root, 2).contains("channels must be 1 or 3"));
    fs::write(root.join("cls/broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let e = err(&root, 3);
    assert!(e.contains("broken.png"), "{e}");
    fs::write(root.join("cls/broken.png"), b"plain text").unwrap();
    let e = err(&root, 3);
    assert!(e.contains("broken.png"), "{e}");
    assert!(!out.exists() && !classes_path(&out).exists());
}

/// A tiny emoji-datasource package: 3 entries (one without a google image, one with a skin
/// variation), 4x4 RGBA PNGs.
fn emoji_package(root: &Path) -> Vec<RgbaImage> {
    let img = root.join("img/google/4");
    fs::create_dir_all(&img).unwrap();
    let json = r#"[
      {"image": "a.png", "category": "Smileys & Emotion", "has_img_google": true, "has_img_twitter": true,
       "skin_variations": {"1F3FC": {"image": "a-c.png", "has_img_google": true},
                           "1F3FB": {"image": "a-b.png", "has_img_google": true},
                           "1F3FD": {"image": "a-d.png", "has_img_google": false}}},
      {"image": "none.png", "category": "Component", "has_img_google": false, "skin_variations": null},
      {"image": "f.png", "category": "Animals & Nature", "has_img_google": true}
    ]"#;
    fs::write(root.join("emoji.json"), json).unwrap();
    let mk = |seed: u32| {
        RgbaImage::from_fn(4, 4, |x, y| {
            let a = [0u8, 127, 128, 255][x as usize];
            Rgba([(seed * 50 + y * 40) as u8, (x * 70) as u8, 255 - (seed * 20) as u8, a])
        })
    };
    let imgs = vec![mk(1), mk(2), mk(3), mk(4)];
    for (name, im) in ["a.png", "a-b.png", "a-c.png", "f.png"].iter().zip(&imgs) {
        im.save(img.join(name)).unwrap();
    }
    imgs
}

#[test]
fn emoji_synthetic_package_pixels_masks_labels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("package");
    let imgs = emoji_package(&root);
    let out = dir.path().join("e.beitds");
    let (h, classes) = import_emoji(&root, "google", 4, &out).unwrap();
    assert_eq!(classes, ["Animals & Nature", "Component", "Smileys & Emotion"]);
    assert_eq!(classes_file(&out), classes);
    assert_eq!(h.count, 4);
    let d = Dataset::open(&out).unwrap();
    assert_eq!((d.header().height, d.header().width, d.header().channels), (4, 4, 3));
    assert!(d.header().has_masks());
    // a.png, then its variations sorted by key (1F3FB = a-b, 1F3FC = a-c), then f.png.
    assert_eq!(labels(&d), [2, 2, 2, 0]);
    for (i, im) in imgs.iter().enumerate() {
        let label = d.label(i).unwrap() as u8;
        let (px, mask) = (d.pixels(i), d.mask(i).unwrap());
        for (j, p) in im.pixels().enumerate() {
            let a = p.0[3];
            let want = [over_black(p.0[0], a), over_black(p.0[1], a), over_black(p.0[2], a)];
            assert_eq!(&px[3 * j..3 * j + 3], want, "sample {i} pixel {j}");
            assert_eq!(mask[j], if a < 128 { 0 } else { label + 1 }, "sample {i} mask {j}");
        }
        // Alpha column x = 0 (transparent) is black, x = 3 (opaque) is the colour.
        assert_eq!(&px[..3], [0, 0, 0]);
        assert_eq!(&px[9..12], &im.get_pixel(3, 0).0[..3]);
    }
    assert_eq!((over_black(255, 128), over_black(255, 127), over_black(200, 255)), (128, 127, 200));

    // Errors: missing set folder, missing image, wrong size, bad json.
    let e = import_emoji(&root, "twitter", 4, &out).unwrap_err().to_string();
    assert!(e.contains("img/twitter/4") && e.contains("does not exist"), "{e}");
    let e = import_emoji(&root, "../x", 4, &out).unwrap_err().to_string();
    assert!(e.contains("plain name"), "{e}");
    fs::remove_file(root.join("img/google/4/a-c.png")).unwrap();
    let out2 = dir.path().join("e2.beitds");
    let e = import_emoji(&root, "google", 4, &out2).unwrap_err().to_string();
    assert!(e.contains("a-c.png"), "{e}");
    RgbaImage::new(5, 4).save(root.join("img/google/4/a-c.png")).unwrap();
    let e = import_emoji(&root, "google", 4, &out2).unwrap_err().to_string();
    assert!(e.contains("a-c.png") && e.contains("5x4"), "{e}");
    fs::write(root.join("emoji.json"), "{\"not\": \"an array\"}").unwrap();
    let e = import_emoji(&root, "google", 4, &out2).unwrap_err().to_string();
    assert!(e.contains("emoji.json"), "{e}");
    fs::write(root.join("emoji.json"), "[{\"image\": \"a.png\", \"has_img_google\": true}]").unwrap();
    let e = import_emoji(&root, "google", 4, &out2).unwrap_err().to_string();
    assert!(e.contains("entry 0 has no string field \"category\""), "{e}");
    assert!(!out2.exists());
}

#[test]
fn cli_import_formats() {
    let bin = env!("CARGO_BIN_EXE_beit");
    let help = std::process::Command::new(bin).args(["dataset", "import", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for word in ["idx", "npy", "image-folder", "emoji", "--dir", "--size", "--set", "--channels"] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("n.beitds");
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    let o = run(&[
        "dataset",
        "import",
        "--format",
        "npy",
        "--images",
        reference("grey_u8.npy").to_str().unwrap(),
        "--labels",
        reference("labels_u1.npy").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["count"], 3);
    let root = dir.path().join("package");
    emoji_package(&root);
    let out = dir.path().join("e.beitds");
    let o = run(&[
        "dataset",
        "import",
        "--format",
        "emoji",
        "--dir",
        root.to_str().unwrap(),
        "--set",
        "google",
        "--size",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["count"].as_u64(), v["classes"].as_array().map(|a| a.len())), (Some(4), Some(3)));
    let o = run(&["dataset", "import", "--format", "npy", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--images is required"));
}

/// The real emoji-datasource-google 16.0.0 package (scripts/fetch-emoji). Ignored by default:
/// needs the download. Run: cargo test --release --test import_formats -- --ignored
#[test]
#[ignore]
fn emoji_real_google_set() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/emoji/google/package");
    assert!(root.join("emoji.json").exists(), "run scripts/fetch-emoji first");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("google.beitds");
    let start = std::time::Instant::now();
    let (h, classes) = import_emoji(&root, "google", 64, &out).unwrap();
    eprintln!("imported {} emoji in {:.2}s", h.count, start.elapsed().as_secs_f64());
    // Every entry and skin variation with has_img_google, which in 16.0.0 is every PNG.
    let pngs = fs::read_dir(root.join("img/google/64")).unwrap().count() as u64;
    assert_eq!(h.count, 3786);
    assert_eq!(h.count, pngs);
    assert_eq!(classes.len(), 10);
    let d = Dataset::open(&out).unwrap();
    assert_eq!((d.header().height, d.header().width, d.header().channels), (64, 64, 3));
    let mut hist = vec![0usize; classes.len()];
    for i in 0..d.len() {
        let label = d.label(i).unwrap() as usize;
        hist[label] += 1;
        let m = d.mask(i).unwrap();
        let fg = m.iter().filter(|&&v| v != 0).count();
        assert!(fg > 64 && fg < 64 * 64, "sample {i}: {fg} foreground pixels");
        assert!(m.iter().all(|&v| v == 0 || v as usize == label + 1));
    }
    assert!(hist.iter().all(|&c| c > 0), "{hist:?}");
}
