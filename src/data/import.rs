//! Importers into the dataset format. IDX (MNIST, Fashion-MNIST): image files (magic
//! 0x00000803, u8 [N, H, W]) and label files (magic 0x00000801, u8 [N]), raw or gzip-compressed
//! (detected from the content, not the file name). All integers in IDX are big-endian.
//!
//! The other formats live in sub-modules: [`npy`] (NumPy `.npy` arrays) and [`images`] (PNG/JPEG
//! image folders and the emoji-datasource packages). docs/dataset-format.md describes each.

/// cbindgen:ignore
pub mod images;
/// cbindgen:ignore
pub mod npy;

pub use images::{classes_path, import_emoji, import_image_folder};
pub use npy::import_npy;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::data::dataset::{DatasetHeader, DatasetSpec, DatasetWriter};
use crate::error::{Error, Result};
use crate::files::{NamedPath, RemovedTemp};
use crate::resources::{try_zeroed, Bytes, Need, MAX_IMAGE_SIDE};

/// Magic of an IDX file of u8 with 3 dimensions (images).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an IDX file of u8 with 1 dimension (labels).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Decoded IDX images: `count` grey images of `height` x `width`, back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

/// An IDX stream and, for an uncompressed file, its length (a gzip stream's is unknown).
struct IdxStream {
    reader: Box<dyn Read>,
    raw_len: Option<u64>,
}

/// Opens `path` as a byte stream, transparently gunzipping when it starts with the gzip magic.
fn open_maybe_gzip(path: &Path) -> Result<IdxStream> {
    let what = path.display();
    let mut file = fs::File::open(path).map_err(|e| Error::Io(format!("cannot open {what}: {e}")))?;
    let len = file.metadata().map_err(|e| Error::Io(format!("cannot stat {what}: {e}")))?.len();
    let mut head = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => bail!(Io, "cannot read {what}: {e}"),
        }
    }
    let prefix = std::io::Cursor::new(head[..got].to_vec());
    let stream = prefix.chain(file);
    if got == 2 && head == [0x1f, 0x8b] {
        Ok(IdxStream { reader: Box::new(flate2::read::MultiGzDecoder::new(stream)), raw_len: None })
    } else {
        Ok(IdxStream { reader: Box::new(stream), raw_len: Some(len) })
    }
}

/// Checks a body of `want` bytes after a `header`-byte header before it is read: against the
/// file's length when the file is uncompressed (the same errors [`read_exact_body`] gives), and
/// against the memory budget, since it is held in memory whole.
fn check_body(stream: &IdxStream, header: u64, want: u64, what: &str, part: &str, object: String) -> Result<()> {
    if let Some(len) = stream.raw_len {
        let have = len.saturating_sub(header);
        ensure!(have >= want, Format, "{what}: truncated: header declares {want} bytes of {part}, file has {have}");
        ensure!(have == want, Format, "{what}: trailing data after the {want} bytes of {part}");
    }
    Need::new(object, Bytes::new(want)).hint("split the file into several smaller ones").check()
}

/// Reads up to `want` bytes (and one more, to detect trailing data). Grows the buffer as data
/// arrives, so a header that claims a huge size cannot force a huge allocation up front.
fn read_exact_body(r: &mut dyn Read, want: u64, what: &str, part: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.take(want.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| Error::Format(format!("{what}: cannot read {part} (corrupt gzip or read error): {e}")))?;
    ensure!(
        buf.len() as u64 >= want,
        Format,
        "{what}: truncated: header declares {want} bytes of {part}, file has {}",
        buf.len()
    );
    ensure!(buf.len() as u64 == want, Format, "{what}: trailing data after the {want} bytes of {part}");
    Ok(buf)
}

fn read_header(r: &mut dyn Read, words: usize, what: &str) -> Result<Vec<u32>> {
    let mut b = vec![0u8; 4 * words];
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) => bail!(Format, "{what}: truncated IDX header: {got} of {} bytes", b.len()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => bail!(Format, "{what}: cannot read IDX header (corrupt gzip or read error): {e}"),
        }
    }
    Ok(b.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn check_magic(magic: u32, want: u32, kind: &str, what: &str) -> Result<()> {
    ensure!(
        magic == want,
        Format,
        "{what}: bad IDX magic {magic:#010x} for {kind} (expected {want:#010x}: u8 data with {} dimension{})",
        want & 0xff,
        if want & 0xff == 1 { "" } else { "s" }
    );
    Ok(())
}

/// Reads an IDX image file (raw or gzip).
pub fn read_idx_images(path: &Path) -> Result<IdxImages> {
    let what = path.display().to_string();
    let mut stream = open_maybe_gzip(path)?;
    let r = &mut stream.reader;
    check_magic(read_header(r, 1, &what)?[0], IDX_IMAGES_MAGIC, "images", &what)?;
    let h = read_header(r, 3, &what)?;
    let (n, rows, cols) = (h[0] as u64, h[1] as u64, h[2] as u64);
    ensure!(rows > 0 && cols > 0, Format, "{what}: IDX image shape {rows}x{cols} has a zero dimension");
    let want = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| Error::Format(format!("{what}: IDX size {n}x{rows}x{cols} overflows")))?;
    check_body(&stream, 16, want, &what, "pixels", format!("the {n} IDX images of {rows}x{cols} in {what}"))?;
    let pixels = read_exact_body(&mut stream.reader, want, &what, "pixels")?;
    Ok(IdxImages { count: n as usize, height: rows as usize, width: cols as usize, pixels })
}

/// Reads an IDX label file (raw or gzip).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let what = path.display().to_string();
    let mut stream = open_maybe_gzip(path)?;
    let r = &mut stream.reader;
    check_magic(read_header(r, 1, &what)?[0], IDX_LABELS_MAGIC, "labels", &what)?;
    let n = read_header(r, 1, &what)?[0];
    check_body(&stream, 8, n as u64, &what, "labels", format!("the {n} IDX labels in {what}"))?;
    read_exact_body(&mut stream.reader, n as u64, &what, "labels")
}

/// Imports an IDX image file (and optionally its label file) into a dataset at `out`: 1 channel,
/// labels u32 when given. Returns the header written.
pub fn import_idx(images: &Path, labels: Option<&Path>, out: &Path) -> Result<DatasetHeader> {
    import_idx_padded(images, labels, out, None)
}

/// [`import_idx`], with every image centred on a zero canvas of `pad_to` = (height, width)
/// when given (extra row/column, if odd, at the bottom/right). Why: 28x28 MNIST-style digits
/// for a model with 32x32 input and patch 4. Resizing them to 32 (what the loader does
/// otherwise) blurs every stroke across the patch grid, and a from-scratch model learns much
/// slower on that (Fashion-MNIST, 10% labels, 300 steps: 49.8% resized vs 62.2% padded, and
/// PyTorch on padded 61.9%); zero padding is what torchvision's `Pad(2)` recipes do.
pub fn import_idx_padded(
    images: &Path,
    labels: Option<&Path>,
    out: &Path,
    pad_to: Option<(usize, usize)>,
) -> Result<DatasetHeader> {
    if let Some((ph, pw)) = pad_to {
        // Checked before the images are read: the canvas and every output image are this size.
        ensure!(
            (1..=MAX_IMAGE_SIDE).contains(&ph) && (1..=MAX_IMAGE_SIDE).contains(&pw),
            InvalidArgument,
            "--pad {ph}x{pw}: each side must be between 1 and {MAX_IMAGE_SIDE} pixels"
        );
    }
    let img = read_idx_images(images)?;
    let (oh, ow) = pad_to.unwrap_or((img.height, img.width));
    ensure!(
        oh >= img.height && ow >= img.width,
        InvalidArgument,
        "--pad {oh}x{ow} is smaller than the {}x{} images of {}",
        img.height,
        img.width,
        images.display()
    );
    Need::new(format!("a {oh}x{ow} padded image"), Bytes::of::<u8>(&[oh, ow])).check()?;
    let (top, left) = ((oh - img.height) / 2, (ow - img.width) / 2);
    let labels = match labels {
        Some(p) => {
            let l = read_idx_labels(p)?;
            ensure!(
                l.len() == img.count,
                Format,
                "{} has {} labels but {} has {} images",
                p.display(),
                l.len(),
                images.display(),
                img.count
            );
            Some(l)
        }
        None => None,
    };
    let to_u32 = |v: usize| u32::try_from(v).map_err(|_| Error::Format(format!("image side {v} too large")));
    let spec = DatasetSpec {
        height: to_u32(oh)?,
        width: to_u32(ow)?,
        channels: 1,
        labels: labels.is_some(),
        masks: false,
        token_grid: None,
    };
    let mut w = DatasetWriter::create(out, spec)?;
    w.reserve(img.count)?;
    let per = img.height * img.width;
    let mut canvas = try_zeroed::<u8>(oh * ow, "the padded image")?;
    for i in 0..img.count {
        let label = labels.as_ref().map(|l| l[i] as u32);
        let src = &img.pixels[i * per..(i + 1) * per];
        if (oh, ow) == (img.height, img.width) {
            w.push(src, label, None, None)?;
            continue;
        }
        for (r, row) in src.chunks_exact(img.width).enumerate() {
            let at = (top + r) * ow + left;
            canvas[at..at + img.width].copy_from_slice(row);
        }
        w.push(&canvas, label, None, None)?;
    }
    w.finish()
}

/// One import: a source format and its inputs, as `beit dataset import` and the C API's
/// `beit_dataset_import` take them. [`import`] runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportSource {
    /// IDX images and optional labels ([`import_idx_padded`]), each image centred on a zero
    /// canvas of `pad` = (height, width) when given.
    Idx { images: PathBuf, labels: Option<PathBuf>, pad: Option<(u32, u32)> },
    /// NumPy `.npy` images and optional labels ([`import_npy`]).
    Npy { images: PathBuf, labels: Option<PathBuf> },
    /// A folder with one sub-folder of images per class, resized to `height` x `width` with
    /// `channels` (1 or 3) ([`import_image_folder`]).
    ImageFolder { dir: PathBuf, height: u32, width: u32, channels: u32 },
    /// An unpacked emoji-datasource package, image set `set` at `size` ([`import_emoji`]).
    Emoji { dir: PathBuf, set: String, size: u32 },
}

/// What [`import`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The header of the dataset file written.
    pub header: DatasetHeader,
    /// The class names in label order (image folders and emoji), also written to
    /// [`classes_path`] of the output.
    pub classes: Option<Vec<String>>,
    /// Temporary files of the output that killed imports had left, removed before writing.
    pub removed_temp_files: Vec<RemovedTemp>,
}

impl ImportSource {
    /// The files and directories the import reads, each with its field name (`images`,
    /// `labels`, `dir`).
    fn inputs(&self) -> Vec<(&'static str, &Path)> {
        match self {
            ImportSource::Idx { images, labels, .. } | ImportSource::Npy { images, labels } => {
                let mut v = vec![("images", images.as_path())];
                v.extend(labels.as_deref().map(|l| ("labels", l)));
                v
            }
            ImportSource::ImageFolder { dir, .. } | ImportSource::Emoji { dir, .. } => vec![("dir", dir.as_path())],
        }
    }
}

/// Runs an import into the dataset file `out` (and, for sources with class names, its
/// [`classes_path`]): refuses, before writing anything, an output that is or lies inside an
/// input (`option` turns a field name, `images`, `labels`, `dir` or `out`, into the name the
/// caller gave it, e.g. `--images`); removes the temporary files of the outputs that killed
/// runs left; then writes the dataset atomically.
pub fn import(source: &ImportSource, out: &Path, option: &dyn Fn(&str) -> String) -> Result<Imported> {
    let classes_file = classes_path(out);
    let reads: Vec<NamedPath> =
        source.inputs().into_iter().map(|(name, path)| NamedPath::new(option(name), path)).collect();
    let writes = [
        NamedPath::new(option("out"), out),
        NamedPath::new(format!("{} (its class names)", option("out")), &classes_file),
    ];
    crate::files::check_outputs_spare_inputs(&writes, &reads)?;
    let mut removed_temp_files = crate::files::remove_stale_temp_files_of(out)?;
    removed_temp_files.extend(crate::files::remove_stale_temp_files_of(&classes_file)?);
    let (header, classes) = match source {
        ImportSource::Idx { images, labels, pad } => {
            let pad = pad.map(|(h, w)| (h as usize, w as usize));
            (import_idx_padded(images, labels.as_deref(), out, pad)?, None)
        }
        ImportSource::Npy { images, labels } => (import_npy(images, labels.as_deref(), out)?, None),
        ImportSource::ImageFolder { dir, height, width, channels } => {
            let (h, names) = import_image_folder(dir, *height, *width, *channels, out)?;
            (h, Some(names))
        }
        ImportSource::Emoji { dir, set, size } => {
            let (h, names) = import_emoji(dir, set, *size, out)?;
            (h, Some(names))
        }
    };
    Ok(Imported { header, classes, removed_temp_files })
}
