//! Importers from image files, decoded with the `image` crate (PNG and JPEG only):
//!
//! - an image folder (one sub-folder per class, like torchvision's `ImageFolder`);
//! - the emoji-datasource npm packages (`emoji.json` plus `img/<set>/<size>/*.png`), with the
//!   emoji category as label and a segmentation mask from the alpha channel.
//!
//! Both write the class names, in label order, as a JSON array of strings to
//! `<out>.classes.json` (see [`classes_path`]).

use std::fs;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader};

use crate::data::dataset::{DatasetHeader, DatasetSpec, DatasetWriter};
use crate::error::{Error, Result};
use crate::resources::{try_zeroed, Bytes, Need, MAX_IMAGE_SIDE};

/// Where the class-name list of a dataset at `out` is written: `out` with `.classes.json`
/// appended to its file name (`train.beitds` -> `train.beitds.classes.json`).
pub fn classes_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".classes.json");
    out.with_file_name(name)
}

/// Writes `names` as a JSON array to [`classes_path`]`(out)`, atomically (temp file + rename).
pub fn write_classes(out: &Path, names: &[String]) -> Result<PathBuf> {
    let path = classes_path(out);
    let json = serde_json::to_string_pretty(names).map_err(|e| Error::Internal(format!("class names to JSON: {e}")))?;
    crate::files::write_atomic(&path, (json + "\n").as_bytes())?;
    Ok(path)
}

/// Decodes a PNG or JPEG file (format from its content, not its name).
fn decode(path: &Path) -> Result<DynamicImage> {
    let what = path.display();
    let reader = ImageReader::open(path)
        .map_err(|e| Error::Io(format!("cannot open image {what}: {e}")))?
        .with_guessed_format()
        .map_err(|e| Error::Io(format!("cannot read image {what}: {e}")))?;
    reader.decode().map_err(|e| Error::Format(format!("cannot decode image {what}: {e}")))
}

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let what = dir.display();
    let rd = fs::read_dir(dir).map_err(|e| Error::Io(format!("cannot read directory {what}: {e}")))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::Io(format!("cannot read directory {what}: {e}")))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| Error::Format(format!("{what}: entry name {n:?} is not UTF-8")))?;
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks, like torchvision.
        let is_dir =
            fs::metadata(&path).map_err(|e| Error::Io(format!("cannot stat {}: {e}", path.display())))?.is_dir();
        out.push((name, path, is_dir));
    }
    // Byte order of UTF-8 names = code point order = Python's sorted().
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
}

/// `Error::InvalidArgument` unless both sides of an output image lie in `1..=MAX_IMAGE_SIDE`,
/// naming the option.
fn check_side(what: &str, height: u32, width: u32) -> Result<()> {
    let ok = |v: u32| (1..=MAX_IMAGE_SIDE).contains(&(v as usize));
    ensure!(
        ok(height) && ok(width),
        InvalidArgument,
        "{what} {height}x{width}: each side must be between 1 and {MAX_IMAGE_SIDE} pixels"
    );
    Ok(())
}

/// Parses an image size: `HxW` (`28x32`) or a single side `S` for a square.
pub fn parse_size(s: &str) -> Result<(u32, u32)> {
    let bad = || Error::InvalidArgument(format!("bad image size {s:?} (expected HxW like 32x32, or one number)"));
    let (h, w) = match s.split_once(['x', 'X']) {
        Some((h, w)) => (h.trim().parse().map_err(|_| bad())?, w.trim().parse().map_err(|_| bad())?),
        None => {
            let v: u32 = s.trim().parse().map_err(|_| bad())?;
            (v, v)
        }
    };
    ensure!(h > 0 && w > 0, InvalidArgument, "image size {s:?} has a zero side");
    Ok((h, w))
}

/// Imports an image folder: `dir/<class>/<image>.{png,jpg,jpeg}`. Classes are the sorted
/// sub-folder names (labels 0..K-1), images are sorted by file name within a class; hidden
/// entries (`.name`), files directly in `dir` and files with other extensions are ignored, a class
/// folder without images is an error. Each image is converted to `channels` (1: the `image`
/// crate's luma, 0.2126 R + 0.7152 G + 0.0722 B; 3: RGB; alpha is dropped, not composited), then
/// resized to `height` x `width` with the crate's bilinear (`FilterType::Triangle`, which widens
/// its kernel when shrinking) if its size differs; the aspect ratio is not kept. Writes the
/// class names to [`classes_path`]. Returns the header and the class names.
pub fn import_image_folder(
    dir: &Path,
    height: u32,
    width: u32,
    channels: u32,
    out: &Path,
) -> Result<(DatasetHeader, Vec<String>)> {
    ensure!(channels == 1 || channels == 3, InvalidArgument, "channels must be 1 or 3, not {channels}");
    check_side("image size", height, width)?;
    ensure!(dir.is_dir(), Io, "image folder {} does not exist or is not a directory", dir.display());
    let mut classes = Vec::new();
    let mut files = Vec::new();
    for (name, path, is_dir) in sorted_entries(dir)? {
        if !is_dir {
            continue;
        }
        let label = classes.len() as u32;
        let before = files.len();
        for (fname, fpath, fdir) in sorted_entries(&path)? {
            if !fdir && is_image_name(&fname) {
                files.push((fpath, label));
            }
        }
        ensure!(files.len() > before, Format, "class folder {} has no .png/.jpg/.jpeg files", path.display());
        classes.push(name);
    }
    ensure!(!classes.is_empty(), Format, "image folder {} has no class sub-folders", dir.display());
    let spec = DatasetSpec { height, width, channels, labels: true, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(out, spec)?;
    w.reserve(files.len())?;
    for (path, label) in &files {
        let img = decode(path)?;
        // The crate's resize keeps a float copy of the input columns at the output height, then
        // the float output and its u8 conversion.
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let (ow, oh, c) = (width as usize, height as usize, channels as usize);
        Need::new(
            format!("resizing {} ({iw}x{ih}) to {oh}x{ow}", path.display()),
            Bytes::floats(&[iw, oh, c]) + Bytes::floats(&[ow, oh, c]) + Bytes::of::<u8>(&[ow, oh, c]),
        )
        .check()?;
        let px = if channels == 1 {
            let g = img.to_luma8();
            if g.dimensions() == (width, height) {
                g.into_raw()
            } else {
                image::imageops::resize(&g, width, height, FilterType::Triangle).into_raw()
            }
        } else {
            let c = img.to_rgb8();
            if c.dimensions() == (width, height) {
                c.into_raw()
            } else {
                image::imageops::resize(&c, width, height, FilterType::Triangle).into_raw()
            }
        };
        w.push(&px, Some(*label), None, None)?;
    }
    let header = w.finish()?;
    write_classes(out, &classes)?;
    Ok((header, classes))
}

/// Composites one RGBA pixel over black: `round(c * a / 255)` per channel.
pub fn over_black(c: u8, a: u8) -> u8 {
    ((c as u32 * a as u32 + 127) / 255) as u8
}

/// Imports an emoji-datasource package (`emoji-datasource-<set>`, unpacked): reads
/// `dir/emoji.json` and, for every entry and every entry's `skin_variations` whose
/// `has_img_<set>` is `true`, the RGBA PNG `dir/img/<set>/<size>/<image>`, which must be
/// `size` x `size`. Samples follow emoji.json order, each entry followed by its skin variations
/// (sorted by key); entries without an image in the set are skipped. Output: RGB composited over
/// black ([`over_black`]); label = index of the entry's `category` among all categories in
/// emoji.json sorted by name (variations inherit their parent's); mask = 0 where alpha < 128,
/// label + 1 elsewhere. Writes the category names to [`classes_path`].
pub fn import_emoji(dir: &Path, set: &str, size: u32, out: &Path) -> Result<(DatasetHeader, Vec<String>)> {
    ensure!(
        !set.is_empty() && set.bytes().all(|c| c.is_ascii_alphanumeric()),
        InvalidArgument,
        "emoji set {set:?} must be a plain name like google or twitter"
    );
    check_side("emoji size", size, size)?;
    let json_path = dir.join("emoji.json");
    let img_dir = dir.join("img").join(set).join(size.to_string());
    ensure!(
        img_dir.is_dir(),
        Io,
        "{} does not exist: is {} an unpacked emoji-datasource-{set} package (scripts/fetch-emoji)?",
        img_dir.display(),
        dir.display()
    );
    let what = json_path.display().to_string();
    let text = fs::read(&json_path).map_err(|e| Error::Io(format!("cannot read {what}: {e}")))?;
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| Error::Format(format!("{what}: not a JSON array of objects: {e}")))?;
    let flag = format!("has_img_{set}");
    let str_field = |e: &serde_json::Value, i: usize, key: &str| -> Result<String> {
        e.get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| Error::Format(format!("{what}: entry {i} has no string field {key:?}")))
    };
    // (image file, category) in output order.
    let mut items: Vec<(String, String)> = Vec::new();
    let mut categories: Vec<String> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        ensure!(e.is_object(), Format, "{what}: entry {i} is not an object");
        let category = str_field(e, i, "category")?;
        categories.push(category.clone());
        if e.get(&flag).and_then(|v| v.as_bool()) == Some(true) {
            items.push((str_field(e, i, "image")?, category.clone()));
        }
        if let Some(vars) = e.get("skin_variations").filter(|v| !v.is_null()) {
            let vars = vars
                .as_object()
                .ok_or_else(|| Error::Format(format!("{what}: entry {i}: skin_variations is not an object")))?;
            let mut keys: Vec<&String> = vars.keys().collect();
            keys.sort();
            for k in keys {
                let v = &vars[k];
                if v.get(&flag).and_then(|b| b.as_bool()) == Some(true) {
                    items.push((str_field(v, i, "image")?, category.clone()));
                }
            }
        }
    }
    categories.sort();
    categories.dedup();
    ensure!(!categories.is_empty(), Format, "{what} has no entries");
    ensure!(categories.len() < 255, Format, "{what}: {} categories do not fit u8 masks", categories.len());
    let spec = DatasetSpec { height: size, width: size, channels: 3, labels: true, masks: true, token_grid: None };
    let n = size as usize * size as usize;
    Need::new(format!("a {size}x{size} emoji image and mask"), Bytes::of::<u8>(&[4, n])).check()?;
    let mut w = DatasetWriter::create(out, spec)?;
    w.reserve(items.len())?;
    let mut px = try_zeroed::<u8>(3 * n, "an emoji image")?;
    let mut mask = try_zeroed::<u8>(n, "an emoji mask")?;
    for (file, category) in &items {
        ensure!(
            !file.contains(['/', '\\']) && file != ".." && !file.is_empty(),
            Format,
            "{what}: image name {file:?} is not a plain file name"
        );
        let path = img_dir.join(file);
        let img = decode(&path)?.to_rgba8();
        ensure!(
            img.dimensions() == (size, size),
            Format,
            "{}: image is {}x{}, expected {size}x{size}",
            path.display(),
            img.width(),
            img.height()
        );
        let label =
            categories.binary_search(category).map_err(|_| Error::Internal("category not found".into()))? as u32;
        for (j, p) in img.as_raw().chunks_exact(4).enumerate() {
            let a = p[3];
            px[3 * j] = over_black(p[0], a);
            px[3 * j + 1] = over_black(p[1], a);
            px[3 * j + 2] = over_black(p[2], a);
            mask[j] = if a < 128 { 0 } else { label as u8 + 1 };
        }
        w.push(&px, Some(label), Some(&mask), None)?;
    }
    let header = w.finish()?;
    write_classes(out, &categories)?;
    Ok((header, categories))
}
