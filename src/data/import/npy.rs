//! NumPy `.npy` files (format versions 1.0, 2.0 and 3.0): a header that is a Python dict literal
//! (`{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`) followed by the raw array.
//! The header is parsed here (a few dozen lines; no crate needed for this subset) and validated
//! strictly: magic, version, header length, the three keys, dtype, shape overflow, and that the
//! data is exactly as long as the shape says. The data itself is streamed, never loaded whole.

use std::fs;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::data::dataset::{DatasetHeader, DatasetSpec, DatasetWriter};
use crate::error::{Error, Result};
use crate::resources::{try_zeroed, Bytes, Need, MAX_CHANNELS, MAX_IMAGE_SIDE};

/// The six bytes every `.npy` file starts with.
pub const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Largest header accepted (NumPy itself refuses headers over 10,000 bytes by default).
pub const NPY_MAX_HEADER: usize = 100_000;

/// Element kinds the importers understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyKind {
    /// Unsigned integer (`u`).
    Unsigned,
    /// Signed integer (`i`).
    Signed,
    /// IEEE float (`f`).
    Float,
}

/// A parsed `.npy` dtype: kind, element size in bytes, byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NpyDtype {
    pub kind: NpyKind,
    pub size: usize,
    pub big_endian: bool,
}

impl NpyDtype {
    /// Parses a simple `descr` such as `|u1`, `<i8`, `>f4`. Structured, string, complex, bool,
    /// datetime and half-float dtypes are rejected.
    pub fn parse(descr: &str) -> Result<Self> {
        let b = descr.as_bytes();
        ensure!(b.len() >= 3, Format, "unsupported dtype {descr:?}");
        let big_endian = match b[0] {
            b'<' | b'|' => false,
            b'>' => true,
            b'=' => cfg!(target_endian = "big"),
            _ => bail!(Format, "unsupported dtype {descr:?} (no byte-order character)"),
        };
        let size: usize = descr[2..].parse().map_err(|_| Error::Format(format!("unsupported dtype {descr:?}")))?;
        let kind = match (b[1], size) {
            (b'u', 1 | 2 | 4 | 8) => NpyKind::Unsigned,
            (b'i', 1 | 2 | 4 | 8) => NpyKind::Signed,
            (b'f', 4 | 8) => NpyKind::Float,
            _ => bail!(Format, "unsupported dtype {descr:?} (supported: integers u1..u8/i1..i8, floats f4/f8)"),
        };
        Ok(NpyDtype { kind, size, big_endian })
    }
}

/// The header of a `.npy` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub version: (u8, u8),
    pub descr: String,
    pub dtype: NpyDtype,
    pub fortran_order: bool,
    pub shape: Vec<u64>,
    /// Bytes before the data (magic, version, length field, header text).
    pub data_offset: u64,
    /// Bytes of data the shape and dtype declare (checked for overflow).
    pub data_len: u64,
}

impl NpyHeader {
    /// Number of elements (product of the shape, 1 for a 0-d array); checked when parsed.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Str(String),
    Bool(bool),
    Int(u64),
    Tuple(Vec<Lit>),
    Other(&'static str),
}

/// A tiny parser for the Python literal subset NumPy writes into headers.
struct LitParser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

impl LitParser<'_> {
    fn ws(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.pos).copied()
    }
    fn eat(&mut self, c: u8) -> Result<()> {
        match self.peek() {
            Some(x) if x == c => {
                self.pos += 1;
                Ok(())
            }
            Some(x) => bail!(Format, "expected '{}' at byte {}, found '{}'", c as char, self.pos, x.escape_ascii()),
            None => bail!(Format, "expected '{}' at byte {}, found the end of the header", c as char, self.pos),
        }
    }
    fn value(&mut self) -> Result<Lit> {
        self.depth += 1;
        ensure!(self.depth < 32, Format, "header nests too deeply");
        let v = match self.peek() {
            Some(q @ (b'\'' | b'"')) => {
                self.pos += 1;
                let start = self.pos;
                while self.pos < self.s.len() && self.s[self.pos] != q {
                    ensure!(self.s[self.pos] != b'\\', Format, "escapes in header strings are not supported");
                    self.pos += 1;
                }
                ensure!(self.pos < self.s.len(), Format, "unterminated string in header");
                let text = std::str::from_utf8(&self.s[start..self.pos])
                    .map_err(|_| Error::Format("header string is not UTF-8".into()))?
                    .to_string();
                self.pos += 1;
                Lit::Str(text)
            }
            Some(open @ (b'(' | b'[')) => {
                let close = if open == b'(' { b')' } else { b']' };
                self.pos += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        break;
                    }
                    items.push(self.value()?);
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(c) if c == close => {}
                        _ => bail!(Format, "expected ',' or '{}' at byte {} of the header", close as char, self.pos),
                    }
                }
                if open == b'(' {
                    Lit::Tuple(items)
                } else {
                    Lit::Other("a list")
                }
            }
            Some(b'{') => {
                // Only the top level may be a dict; a nested one is some other dtype.
                bail!(Format, "unexpected nested dict in header")
            }
            Some(c) if c.is_ascii_alphanumeric() || c == b'-' || c == b'+' => {
                let start = self.pos;
                while self.pos < self.s.len()
                    && (self.s[self.pos].is_ascii_alphanumeric() || b"-+_.".contains(&self.s[self.pos]))
                {
                    self.pos += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                match word {
                    "True" => Lit::Bool(true),
                    "False" => Lit::Bool(false),
                    "None" => Lit::Other("None"),
                    w if w.bytes().all(|c| c.is_ascii_digit()) => Lit::Int(
                        w.parse().map_err(|_| Error::Format(format!("integer {w} in header does not fit u64")))?,
                    ),
                    w if w.starts_with('-') && w[1..].bytes().all(|c| c.is_ascii_digit()) && w.len() > 1 => {
                        Lit::Other("a negative integer")
                    }
                    w => bail!(Format, "unexpected token {w:?} in header"),
                }
            }
            Some(c) => bail!(Format, "unexpected character '{}' at byte {} of the header", c.escape_ascii(), self.pos),
            None => bail!(Format, "header ends early"),
        };
        self.depth -= 1;
        Ok(v)
    }
}

fn parse_dict(text: &[u8]) -> Result<Vec<(String, Lit)>> {
    let mut p = LitParser { s: text, pos: 0, depth: 0 };
    p.eat(b'{')?;
    let mut out: Vec<(String, Lit)> = Vec::new();
    loop {
        if p.peek() == Some(b'}') {
            p.pos += 1;
            break;
        }
        let key = match p.value()? {
            Lit::Str(k) => k,
            _ => bail!(Format, "header dict keys must be strings"),
        };
        p.eat(b':')?;
        let v = p.value()?;
        ensure!(!out.iter().any(|(k, _)| *k == key), Format, "header repeats the key {key:?}");
        out.push((key, v));
        match p.peek() {
            Some(b',') => p.pos += 1,
            Some(b'}') => {}
            _ => bail!(Format, "expected ',' or '}}' at byte {} of the header", p.pos),
        }
    }
    p.ws();
    ensure!(p.pos == text.len(), Format, "unexpected text after the header dict at byte {}", p.pos);
    Ok(out)
}

/// Reads and validates the header of a `.npy` stream; `file_len` (when known) must equal the
/// header plus exactly the declared data (truncation and trailing bytes are errors).
pub fn read_npy_header(r: &mut dyn Read, file_len: Option<u64>, what: &str) -> Result<NpyHeader> {
    let fmt = |m: String| Error::Format(format!("{what}: {m}"));
    let mut pre = [0u8; 8];
    let got = read_full(r, &mut pre, what)?;
    ensure!(got >= 6 && &pre[..6] == NPY_MAGIC, Format, "{what}: not a .npy file (bad magic)");
    ensure!(got == 8, Format, "{what}: truncated .npy header (no version)");
    let version = (pre[6], pre[7]);
    let len_bytes = match version {
        (1, 0) => 2,
        (2, 0) | (3, 0) => 4,
        (a, b) => bail!(Format, "{what}: unsupported .npy format version {a}.{b} (supported: 1.0, 2.0, 3.0)"),
    };
    let mut lb = [0u8; 4];
    ensure!(read_full(r, &mut lb[..len_bytes], what)? == len_bytes, Format, "{what}: truncated .npy header length");
    let hlen = u32::from_le_bytes(lb) as usize;
    ensure!(
        hlen <= NPY_MAX_HEADER,
        Format,
        "{what}: .npy header of {hlen} bytes is too large (at most {NPY_MAX_HEADER})"
    );
    let mut text = vec![0u8; hlen];
    let got = read_full(r, &mut text, what)?;
    ensure!(got == hlen, Format, "{what}: truncated .npy header: {got} of {hlen} bytes");
    // Versions 1 and 2 are latin-1, 3 is UTF-8; the keys and values we accept are ASCII either way.
    let dict = parse_dict(&text).map_err(|e| fmt(format!("bad .npy header: {}", e.message())))?;
    let mut descr = None;
    let mut fortran = None;
    let mut shape = None;
    for (k, v) in dict {
        match (k.as_str(), v) {
            ("descr", Lit::Str(s)) => descr = Some(s),
            ("descr", _) => bail!(Format, "{what}: unsupported dtype (structured or non-string 'descr')"),
            ("fortran_order", Lit::Bool(b)) => fortran = Some(b),
            ("shape", Lit::Tuple(items)) => {
                let mut dims = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Lit::Int(d) => dims.push(d),
                        _ => bail!(Format, "{what}: 'shape' must be a tuple of non-negative integers"),
                    }
                }
                shape = Some(dims);
            }
            (key @ ("fortran_order" | "shape"), _) => bail!(Format, "{what}: bad value for '{key}' in .npy header"),
            (key, _) => bail!(Format, "{what}: unexpected key {key:?} in .npy header"),
        }
    }
    let descr = descr.ok_or_else(|| fmt("the .npy header has no 'descr'".into()))?;
    let fortran_order = fortran.ok_or_else(|| fmt("the .npy header has no 'fortran_order'".into()))?;
    let shape = shape.ok_or_else(|| fmt("the .npy header has no 'shape'".into()))?;
    let dtype = NpyDtype::parse(&descr).map_err(|e| fmt(e.message().to_string()))?;
    ensure!(
        !fortran_order,
        Format,
        "{what}: array is in Fortran (column-major) order; save it C-contiguous (np.ascontiguousarray)"
    );
    let data_len = shape
        .iter()
        .try_fold(dtype.size as u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| fmt(format!("shape {shape:?} of {descr} is too large (size overflows)")))?;
    let data_offset = (8 + len_bytes + hlen) as u64;
    if let Some(len) = file_len {
        let have = len.saturating_sub(data_offset);
        ensure!(
            have >= data_len,
            Format,
            "{what}: truncated: shape {shape:?} of {descr} needs {data_len} data bytes, file has {have}"
        );
        ensure!(have == data_len, Format, "{what}: {} trailing bytes after the {data_len} data bytes", have - data_len);
    }
    Ok(NpyHeader { version, descr, dtype, fortran_order, shape, data_offset, data_len })
}

fn read_full(r: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => bail!(Io, "cannot read {what}: {e}"),
        }
    }
    Ok(got)
}

/// An open `.npy` file: its validated header and a buffered reader positioned at the data.
pub struct NpyFile {
    pub header: NpyHeader,
    reader: BufReader<fs::File>,
    what: String,
    left: u64,
}

impl NpyFile {
    pub fn open(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let file = fs::File::open(path).map_err(|e| Error::Io(format!("cannot open {what}: {e}")))?;
        let len = file.metadata().map_err(|e| Error::Io(format!("cannot stat {what}: {e}")))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let header = read_npy_header(&mut reader, Some(len), &what)?;
        Ok(NpyFile { left: header.data_len, header, reader, what })
    }

    /// Reads exactly `buf.len()` more data bytes (an error if the file shrank meanwhile).
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<()> {
        ensure!(buf.len() as u64 <= self.left, InvalidArgument, "{}: read past the declared data", self.what);
        let got = read_full(&mut self.reader, buf, &self.what)?;
        ensure!(got == buf.len(), Format, "{}: truncated while reading (file changed?)", self.what);
        self.left -= got as u64;
        Ok(())
    }

    /// After all data was read: checks nothing follows (the file did not grow meanwhile).
    pub fn finish(mut self) -> Result<()> {
        ensure!(self.left == 0, InvalidArgument, "{}: {} data bytes left unread", self.what, self.left);
        let mut one = [0u8; 1];
        ensure!(
            read_full(&mut self.reader, &mut one, &self.what)? == 0,
            Format,
            "{}: trailing bytes after the data",
            self.what
        );
        Ok(())
    }
}

fn element_u64(b: &[u8], big: bool) -> u64 {
    let mut a = [0u8; 8];
    if big {
        a[8 - b.len()..].copy_from_slice(b);
        u64::from_be_bytes(a)
    } else {
        a[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(a)
    }
}

/// Reads a 1-d integer `.npy` array of labels, each non-negative and fitting u32.
pub fn read_npy_labels(path: &Path) -> Result<Vec<u32>> {
    let mut f = NpyFile::open(path)?;
    let h = f.header.clone();
    let what = path.display();
    ensure!(h.shape.len() == 1, Format, "{what}: labels must be 1-d [N], shape is {:?}", h.shape);
    ensure!(
        matches!(h.dtype.kind, NpyKind::Unsigned | NpyKind::Signed),
        Format,
        "{what}: labels must have an integer dtype, not {}",
        h.descr
    );
    // data_len equals the file's remaining length (checked on open), so this allocation is backed
    // by bytes that exist; with the u32 labels it is still tested against the budget.
    let count = h.shape[0];
    Need::new(
        format!("the {count} labels of {what}"),
        Bytes::new(h.data_len) + Bytes::of::<u32>(&[usize::try_from(count).unwrap_or(usize::MAX)]),
    )
    .check()?;
    let mut raw = try_zeroed::<u8>(h.data_len as usize, "the labels")?;
    f.read_data(&mut raw)?;
    f.finish()?;
    let size = h.dtype.size;
    let mut out = Vec::with_capacity(raw.len() / size);
    for (i, b) in raw.chunks_exact(size).enumerate() {
        let u = element_u64(b, h.dtype.big_endian);
        let v: i128 = if h.dtype.kind == NpyKind::Signed {
            let shift = 64 - 8 * size as u32;
            (((u << shift) as i64) >> shift) as i128
        } else {
            u as i128
        };
        ensure!(v >= 0, Format, "{what}: label {i} is negative ({v})");
        ensure!(v <= u32::MAX as i128, Format, "{what}: label {i} = {v} does not fit u32");
        out.push(v as u32);
    }
    Ok(out)
}

/// Float value to a u8 pixel: `round(x * 255)` (half away from zero), clamped to 0..=255. Values
/// more than one step (1/255) outside [0, 1], and NaN, are errors: such an array is most likely
/// in 0..255 or normalised with a mean and std, and clamping would silently destroy it.
fn float_to_u8(x: f64, i: u64, what: &str) -> Result<u8> {
    let tol = 1.0 / 255.0;
    ensure!(
        x >= -tol && x <= 1.0 + tol,
        Format,
        "{what}: float pixel {i} is {x}, outside [0, 1] (float images must be scaled to [0, 1])"
    );
    Ok((x * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// Imports a `.npy` image array (and optionally a label array) into a dataset at `out`.
///
/// Images: shape [N, H, W] (C = 1) or [N, H, W, C], dtype u1 (copied as is) or f4/f8 in [0, 1]
/// (converted with `round(x * 255)`), C order. Labels: shape [N], any integer dtype, values in
/// 0..=u32::MAX. Returns the header written.
pub fn import_npy(images: &Path, labels: Option<&Path>, out: &Path) -> Result<DatasetHeader> {
    let what = images.display().to_string();
    let mut f = NpyFile::open(images)?;
    let h = f.header.clone();
    let (n, hh, ww, c) = match h.shape[..] {
        [n, hh, ww] => (n, hh, ww, 1),
        [n, hh, ww, c] => (n, hh, ww, c),
        _ => bail!(Format, "{what}: images must have shape [N, H, W] or [N, H, W, C], not {:?}", h.shape),
    };
    ensure!(hh > 0 && ww > 0 && c > 0, Format, "{what}: image shape {:?} has a zero dimension", h.shape);
    ensure!(
        hh <= MAX_IMAGE_SIDE as u64 && ww <= MAX_IMAGE_SIDE as u64 && c <= MAX_CHANNELS as u64,
        Format,
        "{what}: images of {hh}x{ww}x{c} (HxWxC) are beyond the limits of {MAX_IMAGE_SIDE} pixels a side and \
         {MAX_CHANNELS} channels"
    );
    let to_u32 = |v: u64, name: &str| {
        u32::try_from(v).map_err(|_| Error::Format(format!("{what}: image {name} {v} does not fit u32")))
    };
    let (hh, ww, c) = (to_u32(hh, "height")?, to_u32(ww, "width")?, to_u32(c, "channels")?);
    let is_u8 = h.dtype.kind == NpyKind::Unsigned && h.dtype.size == 1;
    ensure!(
        is_u8 || h.dtype.kind == NpyKind::Float,
        Format,
        "{what}: unsupported image dtype {} (supported: u1, or f4/f8 in [0, 1])",
        h.descr
    );
    let labels = match labels {
        Some(p) => {
            let l = read_npy_labels(p)?;
            ensure!(l.len() as u64 == n, Format, "{} has {} labels but {what} has {n} images", p.display(), l.len());
            Some(l)
        }
        None => None,
    };
    let spec =
        DatasetSpec { height: hh, width: ww, channels: c, labels: labels.is_some(), masks: false, token_grid: None };
    // With N > 0 one sample's bytes are at most the data length, which the file really has; with
    // N = 0 nothing is allocated.
    let per = h.data_len.checked_div(n).map_or(0, |b| (b / h.dtype.size as u64) as usize);
    Need::new(
        format!("one {hh}x{ww}x{c} image of {what} as {} and as u8", h.descr),
        Bytes::of::<u8>(&[per, h.dtype.size + 1]),
    )
    .check()?;
    let mut w = DatasetWriter::create(out, spec)?;
    w.reserve(usize::try_from(n).unwrap_or(usize::MAX))?;
    let mut raw = try_zeroed::<u8>(per * h.dtype.size, "an image")?;
    let mut px = try_zeroed::<u8>(per, "an image")?;
    for i in 0..n {
        f.read_data(&mut raw)?;
        if is_u8 {
            px.copy_from_slice(&raw);
        } else {
            for (j, (b, p)) in raw.chunks_exact(h.dtype.size).zip(px.iter_mut()).enumerate() {
                let bits = element_u64(b, h.dtype.big_endian);
                let x = if h.dtype.size == 4 { f32::from_bits(bits as u32) as f64 } else { f64::from_bits(bits) };
                *p = float_to_u8(x, i * per as u64 + j as u64, &what)?;
            }
        }
        w.push(&px, labels.as_ref().map(|l| l[i as usize]), None, None)?;
    }
    f.finish()?;
    w.finish()
}
