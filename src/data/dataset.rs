//! The on-disk image dataset format (`.beitds`, specified in docs/dataset-format.md): a fixed
//! 128-byte little-endian header followed by 64-byte aligned sections (pixels HWC u8, and
//! optionally labels u32, segmentation masks u8 [H,W], visual-token grids u16 [gh,gw]).
//!
//! [`Dataset::open`] memory-maps a file and validates every header field, offset and length
//! against the file size before it hands out a single slice; accessors are zero copy.
//! [`DatasetWriter`] streams pixels to a temporary file next to the target and renames it into
//! place (after fsync) in [`DatasetWriter::finish`], so a reader never sees a partial file.

use std::fs;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::resources::{Bytes, Need, MAX_CHANNELS, MAX_IMAGE_SIDE};

// Short names for format strings.
const VERSION: u32 = DatasetHeader::VERSION;
const HEADER_SIZE: u32 = DatasetHeader::SIZE;
const SECTION_ALIGN: u64 = DatasetHeader::SECTION_ALIGN;
const PIXEL_LAYOUT_HWC_U8: u32 = DatasetHeader::PIXEL_LAYOUT_HWC_U8;
const KNOWN_FLAGS: u32 = DatasetHeader::FLAG_LABELS | DatasetHeader::FLAG_MASKS | DatasetHeader::FLAG_TOKENS;

/// Byte range of one section inside the file; `offset == 0 && length == 0` when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Section {
    pub offset: u64,
    pub length: u64,
}

/// The decoded, validated header of a dataset file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetHeader {
    pub version: u32,
    pub header_size: u32,
    pub count: u64,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub pixel_layout: u32,
    pub flags: u32,
    /// Token grid rows and columns; both 0 unless `flags & DatasetHeader::FLAG_TOKENS`.
    pub token_grid_h: u32,
    pub token_grid_w: u32,
    pub pixels: Section,
    pub labels: Section,
    pub masks: Section,
    pub tokens: Section,
}

impl DatasetHeader {
    /// The 8 bytes every dataset file starts with.
    pub const MAGIC: [u8; 8] = *b"BEITDS\0\x01";
    /// The format version this code writes and the only one it reads.
    pub const VERSION: u32 = 1;
    /// Size of the version-1 header in bytes.
    pub const SIZE: u32 = 128;
    /// Every section starts at a multiple of this.
    pub const SECTION_ALIGN: u64 = 64;
    /// `pixel_layout` value: interleaved u8 [H, W, C] per sample.
    pub const PIXEL_LAYOUT_HWC_U8: u32 = 1;
    /// Flag: a labels section (u32 per sample) is present.
    pub const FLAG_LABELS: u32 = 1 << 0;
    /// Flag: a masks section (u8 [H, W] per sample) is present.
    pub const FLAG_MASKS: u32 = 1 << 1;
    /// Flag: a tokens section (u16 [gh, gw] per sample) is present.
    pub const FLAG_TOKENS: u32 = 1 << 2;

    pub fn has_labels(&self) -> bool {
        self.flags & DatasetHeader::FLAG_LABELS != 0
    }
    pub fn has_masks(&self) -> bool {
        self.flags & DatasetHeader::FLAG_MASKS != 0
    }
    pub fn has_tokens(&self) -> bool {
        self.flags & DatasetHeader::FLAG_TOKENS != 0
    }
    /// Bytes of one sample's pixels (H·W·C). Valid after [`DatasetHeader::validate`].
    pub fn pixel_bytes(&self) -> usize {
        self.height as usize * self.width as usize * self.channels as usize
    }
    /// Bytes of one sample's mask (H·W).
    pub fn mask_bytes(&self) -> usize {
        self.height as usize * self.width as usize
    }
    /// Tokens per sample (gh·gw).
    pub fn tokens_per_sample(&self) -> usize {
        self.token_grid_h as usize * self.token_grid_w as usize
    }
    /// Names of the sections present, in the order pixels, labels, masks, tokens.
    pub fn section_names(&self) -> Vec<&'static str> {
        let mut v = vec!["pixels"];
        if self.has_labels() {
            v.push("labels");
        }
        if self.has_masks() {
            v.push("masks");
        }
        if self.has_tokens() {
            v.push("tokens");
        }
        v
    }

    /// The 128 header bytes.
    pub fn to_bytes(&self) -> [u8; DatasetHeader::SIZE as usize] {
        let mut b = [0u8; DatasetHeader::SIZE as usize];
        b[0..8].copy_from_slice(&DatasetHeader::MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..28].copy_from_slice(&self.height.to_le_bytes());
        b[28..32].copy_from_slice(&self.width.to_le_bytes());
        b[32..36].copy_from_slice(&self.channels.to_le_bytes());
        b[36..40].copy_from_slice(&self.pixel_layout.to_le_bytes());
        b[40..44].copy_from_slice(&self.flags.to_le_bytes());
        b[44..48].copy_from_slice(&self.token_grid_h.to_le_bytes());
        b[48..52].copy_from_slice(&self.token_grid_w.to_le_bytes());
        // 52..56 reserved, zero.
        for (i, s) in [self.pixels, self.labels, self.masks, self.tokens].iter().enumerate() {
            let at = 56 + 16 * i;
            b[at..at + 8].copy_from_slice(&s.offset.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.length.to_le_bytes());
        }
        // 120..128 reserved, zero.
        b
    }

    /// Decodes and validates a header against the size of the file it came from. `bytes` is the
    /// start of the file (any length; too short is an error, never a panic).
    pub fn parse(bytes: &[u8], file_len: u64, what: &str) -> Result<Self> {
        ensure!(
            bytes.len() >= 8 && file_len >= 8,
            Format,
            "{what}: not a beit dataset: file is {file_len} bytes, shorter than the 8-byte magic"
        );
        ensure!(
            bytes[0..8] == DatasetHeader::MAGIC,
            Format,
            "{what}: not a beit dataset: bad magic {:02x?}",
            &bytes[0..8]
        );
        ensure!(
            bytes.len() >= 12,
            Format,
            "{what}: truncated header: file is {file_len} bytes, the version field ends at byte 12"
        );
        let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let version = u32_at(8);
        ensure!(
            version == DatasetHeader::VERSION,
            Format,
            "{what}: unsupported dataset format version {version} (this build reads version {VERSION})"
        );
        ensure!(
            bytes.len() >= DatasetHeader::SIZE as usize && file_len >= DatasetHeader::SIZE as u64,
            Format,
            "{what}: truncated header: file is {file_len} bytes, the version-{VERSION} header is {HEADER_SIZE}"
        );
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let section = |i: usize| Section { offset: u64_at(56 + 16 * i), length: u64_at(64 + 16 * i) };
        let h = DatasetHeader {
            version,
            header_size: u32_at(12),
            count: u64_at(16),
            height: u32_at(24),
            width: u32_at(28),
            channels: u32_at(32),
            pixel_layout: u32_at(36),
            flags: u32_at(40),
            token_grid_h: u32_at(44),
            token_grid_w: u32_at(48),
            pixels: section(0),
            labels: section(1),
            masks: section(2),
            tokens: section(3),
        };
        ensure!(u32_at(52) == 0 && u64_at(120) == 0, Format, "{what}: reserved header fields are not zero");
        h.validate(file_len, what)?;
        Ok(h)
    }

    /// Checks every field, and every section against `file_len`, with checked arithmetic.
    pub fn validate(&self, file_len: u64, what: &str) -> Result<()> {
        ensure!(
            self.version == DatasetHeader::VERSION,
            Format,
            "{what}: unsupported dataset format version {} (this build reads version {VERSION})",
            self.version
        );
        ensure!(
            self.header_size == DatasetHeader::SIZE,
            Format,
            "{what}: header size {} is wrong for format version {VERSION} (must be {HEADER_SIZE})",
            self.header_size
        );
        ensure!(
            self.flags & !KNOWN_FLAGS == 0,
            Format,
            "{what}: unknown section flags {:#x} (known: {KNOWN_FLAGS:#x})",
            self.flags & !KNOWN_FLAGS
        );
        ensure!(
            self.pixel_layout == DatasetHeader::PIXEL_LAYOUT_HWC_U8,
            Format,
            "{what}: unknown pixel layout {} (only {PIXEL_LAYOUT_HWC_U8} = HWC u8 is defined)",
            self.pixel_layout
        );
        ensure!(
            self.height > 0 && self.width > 0 && self.channels > 0,
            Format,
            "{what}: image shape {}x{}x{} (HxWxC) has a zero dimension",
            self.height,
            self.width,
            self.channels
        );
        if self.has_tokens() {
            ensure!(
                self.token_grid_h > 0 && self.token_grid_w > 0,
                Format,
                "{what}: tokens section present but token grid is {}x{}",
                self.token_grid_h,
                self.token_grid_w
            );
        } else {
            ensure!(
                self.token_grid_h == 0 && self.token_grid_w == 0,
                Format,
                "{what}: token grid {}x{} given without the tokens flag",
                self.token_grid_h,
                self.token_grid_w
            );
        }
        let mul = |a: u64, b: u64, name: &str| {
            a.checked_mul(b).ok_or_else(|| {
                Error::Format(format!(
                    "{what}: {name} section size overflows: {a} x {b} (declared count or shape too large)"
                ))
            })
        };
        let hw = mul(self.height as u64, self.width as u64, "mask")?;
        let hwc = mul(hw, self.channels as u64, "pixels")?;
        let grid = mul(self.token_grid_h as u64, self.token_grid_w as u64, "tokens")?;
        let sections = [
            ("pixels", true, self.pixels, hwc),
            ("labels", self.has_labels(), self.labels, 4),
            ("masks", self.has_masks(), self.masks, hw),
            ("tokens", self.has_tokens(), self.tokens, mul(grid, 2, "tokens")?),
        ];
        let mut present: Vec<(u64, u64, &str)> = Vec::new();
        for (name, on, s, per_sample) in sections {
            if !on {
                ensure!(
                    s.offset == 0 && s.length == 0,
                    Format,
                    "{what}: {name} section is absent (flag not set) but has offset {} length {}",
                    s.offset,
                    s.length
                );
                continue;
            }
            let expected = mul(self.count, per_sample, name)?;
            ensure!(
                s.length == expected,
                Format,
                "{what}: {name} section length {} does not match count {} x {per_sample} bytes = {expected}",
                s.length,
                self.count
            );
            ensure!(
                s.offset % DatasetHeader::SECTION_ALIGN == 0,
                Format,
                "{what}: {name} section offset {} is not {SECTION_ALIGN}-byte aligned",
                s.offset
            );
            ensure!(
                s.offset >= self.header_size as u64,
                Format,
                "{what}: {name} section offset {} lies inside the header",
                s.offset
            );
            let end = s.offset.checked_add(s.length).ok_or_else(|| {
                Error::Format(format!("{what}: {name} section offset {} + length {} overflows", s.offset, s.length))
            })?;
            ensure!(
                end <= file_len,
                Format,
                "{what}: {name} section [{}, {end}) runs past the end of the file ({file_len} bytes; truncated?)",
                s.offset
            );
            ensure!(
                usize::try_from(end).is_ok(),
                Format,
                "{what}: {name} section end {end} does not fit this platform's address space"
            );
            present.push((s.offset, end, name));
        }
        present.sort();
        for w in present.windows(2) {
            ensure!(
                w[0].1 <= w[1].0 || w[0].0 == w[0].1 || w[1].0 == w[1].1,
                Format,
                "{what}: sections {} and {} overlap",
                w[0].2,
                w[1].2
            );
        }
        // Last, since the sections say more about a corrupt file: a shape that fits its file
        // (no images, or tiny ones) can still be one no consumer should size buffers from.
        ensure!(
            self.height as usize <= MAX_IMAGE_SIDE
                && self.width as usize <= MAX_IMAGE_SIDE
                && self.channels as usize <= MAX_CHANNELS,
            Format,
            "{what}: image shape {}x{}x{} (HxWxC) is beyond the limits of {MAX_IMAGE_SIDE} pixels a side and \
             {MAX_CHANNELS} channels",
            self.height,
            self.width,
            self.channels
        );
        Ok(())
    }
}

/// A validated, memory-mapped dataset file. Accessors borrow from the map (zero copy).
///
/// Like every mmap reader, it assumes the file is not truncated or rewritten by another process
/// while open ([`DatasetWriter`] replaces files by rename, which is safe).
pub struct Dataset {
    map: memmap2::Mmap,
    header: DatasetHeader,
    path: PathBuf,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset").field("path", &self.path).field("header", &self.header).finish()
    }
}

impl Dataset {
    /// Maps `path` and validates it (docs/dataset-format.md, "Validation").
    pub fn open(path: &Path) -> Result<Self> {
        let what = path.display().to_string();
        let file = fs::File::open(path).map_err(|e| Error::Io(format!("cannot open {what}: {e}")))?;
        let file_len = file.metadata().map_err(|e| Error::Io(format!("cannot stat {what}: {e}")))?.len();
        ensure!(
            file_len >= 8,
            Format,
            "{what}: not a beit dataset: file is {file_len} bytes, shorter than the 8-byte magic"
        );
        // SAFETY: the map is read-only; a file truncated underneath us by another process is
        // the one case memmap cannot guard against, as with every mmap reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io(format!("cannot map {what}: {e}")))?;
        let header = DatasetHeader::parse(&map, map.len() as u64, &what)?;
        if header.has_tokens() {
            // Sections are 64-byte aligned within a page-aligned map, so this always holds; it
            // is what makes the &[u16] views of `tokens` sound.
            let at = map.as_ptr() as usize + header.tokens.offset as usize;
            ensure!(
                at.is_multiple_of(std::mem::align_of::<u16>()),
                Format,
                "{what}: tokens section is not 2-byte aligned in memory"
            );
        }
        Ok(Dataset { map, header, path: path.to_path_buf() })
    }

    pub fn header(&self) -> &DatasetHeader {
        &self.header
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.header.count as usize // validated: count x pixel bytes fits in the file
    }
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    fn slice(&self, s: Section, i: usize, per: usize) -> &[u8] {
        assert!(i < self.len(), "sample {i} out of range (dataset has {})", self.len());
        let start = s.offset as usize + i * per;
        &self.map[start..start + per]
    }

    /// Pixels of sample `i`, u8 [H, W, C]. Panics if `i >= len()` (like slice indexing).
    pub fn pixels(&self, i: usize) -> &[u8] {
        self.slice(self.header.pixels, i, self.header.pixel_bytes())
    }
    /// The whole pixel section, `len()` samples back to back.
    pub fn all_pixels(&self) -> &[u8] {
        let s = self.header.pixels;
        &self.map[s.offset as usize..(s.offset + s.length) as usize]
    }
    /// Label of sample `i`, if the file has labels. Panics if `i >= len()`.
    pub fn label(&self, i: usize) -> Option<u32> {
        if !self.header.has_labels() {
            return None;
        }
        let b = self.slice(self.header.labels, i, 4);
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Segmentation mask of sample `i`, u8 [H, W], if the file has masks. Panics if `i >= len()`.
    pub fn mask(&self, i: usize) -> Option<&[u8]> {
        self.header.has_masks().then(|| self.slice(self.header.masks, i, self.header.mask_bytes()))
    }
    /// Raw little-endian bytes of sample `i`'s token grid (2·gh·gw bytes), if present.
    pub fn tokens_le_bytes(&self, i: usize) -> Option<&[u8]> {
        self.header.has_tokens().then(|| self.slice(self.header.tokens, i, 2 * self.header.tokens_per_sample()))
    }
    /// Token grid of sample `i`, u16 [gh, gw] row-major, if present. Zero copy on little-endian
    /// hosts (the section is 64-byte aligned, so the view is always aligned).
    #[cfg(target_endian = "little")]
    pub fn tokens(&self, i: usize) -> Option<&[u16]> {
        let bytes = self.tokens_le_bytes(i)?;
        // SAFETY: u16 has no invalid bit patterns; align_to only puts correctly aligned
        // elements in the middle slice, and `open` checked the section is 2-byte aligned, so
        // prefix and suffix are empty (asserted) and no misaligned &[u16] is ever made.
        let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
        assert!(pre.is_empty() && post.is_empty(), "tokens section misaligned");
        Some(mid)
    }
}

/// What a [`DatasetWriter`] writes: the image shape and which optional sections every sample has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetSpec {
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub labels: bool,
    pub masks: bool,
    /// Token grid (gh, gw) when every sample carries visual tokens.
    pub token_grid: Option<(u32, u32)>,
}

/// Writes a dataset file: pixels stream to a temporary file beside the target; labels, masks and
/// tokens are kept in memory until [`DatasetWriter::finish`] appends them, writes the header,
/// fsyncs and renames the file into place. Dropping an unfinished writer removes the temp file.
pub struct DatasetWriter {
    spec: DatasetSpec,
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<fs::File>>,
    count: u64,
    labels: Vec<u8>,
    masks: Vec<u8>,
    tokens: Vec<u8>,
}

impl DatasetWriter {
    pub fn create(path: &Path, spec: DatasetSpec) -> Result<Self> {
        ensure!(
            spec.height > 0 && spec.width > 0 && spec.channels > 0,
            InvalidArgument,
            "dataset image shape {}x{}x{} (HxWxC) has a zero dimension",
            spec.height,
            spec.width,
            spec.channels
        );
        ensure!(
            spec.height as usize <= MAX_IMAGE_SIDE
                && spec.width as usize <= MAX_IMAGE_SIDE
                && spec.channels as usize <= MAX_CHANNELS,
            InvalidArgument,
            "dataset image shape {}x{}x{} (HxWxC) is beyond the limits of {MAX_IMAGE_SIDE} pixels a side and \
             {MAX_CHANNELS} channels",
            spec.height,
            spec.width,
            spec.channels
        );
        if let Some((gh, gw)) = spec.token_grid {
            ensure!(gh > 0 && gw > 0, InvalidArgument, "token grid {gh}x{gw} has a zero dimension");
            ensure!(
                gh as usize <= MAX_IMAGE_SIDE && gw as usize <= MAX_IMAGE_SIDE,
                InvalidArgument,
                "token grid {gh}x{gw} is larger than {MAX_IMAGE_SIDE} a side"
            );
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        ensure!(!name.is_empty(), InvalidArgument, "dataset path {} has no file name", path.display());
        // A name of its own (crate::files): a killed writer's leftover is recognised and removed later.
        let tmp = crate::files::temp_path_beside(path)?;
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::Io(format!("cannot create {}: {e}", tmp.display())))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; DatasetHeader::SIZE as usize])
            .map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.display())))?;
        Ok(DatasetWriter {
            spec,
            path: path.to_path_buf(),
            tmp,
            out: Some(out),
            count: 0,
            labels: Vec::new(),
            masks: Vec::new(),
            tokens: Vec::new(),
        })
    }

    /// Plans `count` more samples (before they are pushed): the file that the samples pushed so
    /// far and these make must have a size that 64-bit arithmetic can express, and the sections
    /// kept in memory until [`DatasetWriter::finish`] (labels, masks, tokens) for all of them must
    /// fit the memory budget. Reserves those sections, so pushing `count` samples never
    /// reallocates. Importers and copies call it with the sample count they know before they
    /// write; hosts that append in chunks, before each chunk.
    pub fn reserve(&mut self, count: usize) -> Result<()> {
        let s = self.spec;
        let more = count;
        let Some(count) = usize::try_from(self.count).ok().and_then(|have| have.checked_add(more)) else {
            bail!(InvalidArgument, "{} samples and {more} more overflow the sample count", self.count);
        };
        let hw = (s.height as usize).checked_mul(s.width as usize);
        let per_sample = |bytes: Option<usize>, on: bool| if on { bytes } else { Some(0) };
        let labels = per_sample(Some(4), s.labels);
        let masks = per_sample(hw, s.masks);
        let tokens = match s.token_grid {
            Some((gh, gw)) => (gh as usize).checked_mul(2 * gw as usize),
            None => Some(0),
        };
        let pixels = hw.and_then(|v| v.checked_mul(s.channels as usize));
        let section = |per: Option<usize>| per.and_then(|p| p.checked_mul(count));
        let file = [pixels, labels, masks, tokens]
            .into_iter()
            .try_fold(DatasetHeader::SIZE as u64 + 4 * DatasetHeader::SECTION_ALIGN, |acc, per| {
                acc.checked_add(section(per)? as u64)
            });
        ensure!(
            file.is_some(),
            InvalidArgument,
            "{} samples of {}x{}x{} (HxWxC) make a dataset file larger than 2^64 bytes",
            count,
            s.height,
            s.width,
            s.channels
        );
        let in_memory: Bytes =
            [labels, masks, tokens].into_iter().map(|per| Bytes::from(section(per).map(|b| b as u64))).sum();
        Need::new(
            format!("the labels, masks and tokens of {count} samples (kept in memory until the file is finished)"),
            in_memory,
        )
        .hint("import or copy the data in several smaller files")
        .check()?;
        let oom = |what: &str| Error::InvalidArgument(format!("cannot allocate the {what} of {count} samples"));
        let bytes = |per: Option<usize>| per.and_then(|p| p.checked_mul(more)).unwrap_or(0);
        // Amortised growth (at most twice what the budget admitted): a host appending in many
        // small chunks would otherwise copy the sections once per chunk. The first reserve of
        // an empty writer (an importer's one call) allocates exactly.
        self.labels.try_reserve(bytes(labels)).map_err(|_| oom("labels"))?;
        self.masks.try_reserve(bytes(masks)).map_err(|_| oom("masks"))?;
        self.tokens.try_reserve(bytes(tokens)).map_err(|_| oom("tokens"))?;
        Ok(())
    }

    /// The shape and sections every sample has.
    pub fn spec(&self) -> &DatasetSpec {
        &self.spec
    }

    /// Samples pushed so far.
    pub fn len(&self) -> u64 {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one sample. Each optional part must be given exactly when the spec declares it.
    pub fn push(
        &mut self,
        pixels: &[u8],
        label: Option<u32>,
        mask: Option<&[u8]>,
        tokens: Option<&[u16]>,
    ) -> Result<()> {
        let s = self.spec;
        let hw = s.height as usize * s.width as usize;
        ensure!(
            pixels.len() == hw * s.channels as usize,
            InvalidArgument,
            "sample {}: {} pixel bytes, expected {}x{}x{} = {}",
            self.count,
            pixels.len(),
            s.height,
            s.width,
            s.channels,
            hw * s.channels as usize
        );
        ensure!(
            label.is_some() == s.labels,
            InvalidArgument,
            "sample {}: label {} but the dataset {} labels",
            self.count,
            if label.is_some() { "given" } else { "missing" },
            if s.labels { "has" } else { "has no" }
        );
        match (mask, s.masks) {
            (Some(m), true) => ensure!(
                m.len() == hw,
                InvalidArgument,
                "sample {}: mask has {} bytes, expected {}x{} = {hw}",
                self.count,
                m.len(),
                s.height,
                s.width
            ),
            (None, false) => {}
            (m, _) => bail!(
                InvalidArgument,
                "sample {}: mask {} but the dataset {} masks",
                self.count,
                if m.is_some() { "given" } else { "missing" },
                if s.masks { "has" } else { "has no" }
            ),
        }
        match (tokens, s.token_grid) {
            (Some(t), Some((gh, gw))) => ensure!(
                t.len() == gh as usize * gw as usize,
                InvalidArgument,
                "sample {}: {} tokens, expected {gh}x{gw}",
                self.count,
                t.len()
            ),
            (None, None) => {}
            (t, g) => bail!(
                InvalidArgument,
                "sample {}: tokens {} but the dataset {} tokens",
                self.count,
                if t.is_some() { "given" } else { "missing" },
                if g.is_some() { "has" } else { "has no" }
            ),
        }
        let out = self.out.as_mut().ok_or_else(|| Error::InvalidArgument("dataset writer already finished".into()))?;
        out.write_all(pixels).map_err(|e| Error::Io(format!("cannot write {}: {e}", self.tmp.display())))?;
        if let Some(l) = label {
            self.labels.extend_from_slice(&l.to_le_bytes());
        }
        if let Some(m) = mask {
            self.masks.extend_from_slice(m);
        }
        if let Some(t) = tokens {
            self.tokens.extend(t.iter().flat_map(|v| v.to_le_bytes()));
        }
        self.count += 1;
        Ok(())
    }

    /// Writes the remaining sections and the header, fsyncs, and renames into place.
    pub fn finish(mut self) -> Result<DatasetHeader> {
        let tmp = self.tmp.clone();
        let io = |what: &str, e: std::io::Error| Error::Io(format!("{what} {}: {e}", tmp.display()));
        let mut out =
            self.out.take().ok_or_else(|| Error::InvalidArgument("dataset writer already finished".into()))?;
        let s = self.spec;
        let pixel_len = self.count * s.height as u64 * s.width as u64 * s.channels as u64;
        let mut pos = DatasetHeader::SIZE as u64 + pixel_len;
        let mut flags = 0;
        let mut put = |out: &mut BufWriter<fs::File>, on: bool, flag: u32, data: &[u8]| -> Result<Section> {
            if !on {
                return Ok(Section::default());
            }
            flags |= flag;
            let pad = pos.next_multiple_of(DatasetHeader::SECTION_ALIGN) - pos;
            out.write_all(&vec![0u8; pad as usize]).map_err(|e| io("cannot write", e))?;
            let section = Section { offset: pos + pad, length: data.len() as u64 };
            out.write_all(data).map_err(|e| io("cannot write", e))?;
            pos = section.offset + section.length;
            Ok(section)
        };
        let labels = put(&mut out, s.labels, DatasetHeader::FLAG_LABELS, &self.labels)?;
        let masks = put(&mut out, s.masks, DatasetHeader::FLAG_MASKS, &self.masks)?;
        let tokens = put(&mut out, s.token_grid.is_some(), DatasetHeader::FLAG_TOKENS, &self.tokens)?;
        let (gh, gw) = s.token_grid.unwrap_or((0, 0));
        let header = DatasetHeader {
            version: DatasetHeader::VERSION,
            header_size: DatasetHeader::SIZE,
            count: self.count,
            height: s.height,
            width: s.width,
            channels: s.channels,
            pixel_layout: DatasetHeader::PIXEL_LAYOUT_HWC_U8,
            flags,
            token_grid_h: gh,
            token_grid_w: gw,
            pixels: Section { offset: DatasetHeader::SIZE as u64, length: pixel_len },
            labels,
            masks,
            tokens,
        };
        header.validate(pos, &self.path.display().to_string())?;
        out.seek(SeekFrom::Start(0)).map_err(|e| io("cannot seek", e))?;
        out.write_all(&header.to_bytes()).map_err(|e| io("cannot write", e))?;
        let file = out.into_inner().map_err(|e| io("cannot write", e.into_error()))?;
        file.sync_all().map_err(|e| io("cannot sync", e))?;
        drop(file);
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::Io(format!("cannot rename {} to {}: {e}", self.tmp.display(), self.path.display())))?;
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(header)
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        // Still holding the file: finish() never ran or failed before the rename.
        if self.out.take().is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
