//! Hugging Face model directories: `config.json` + `model.safetensors` with HF parameter names.
//! Files are validated before use (safetensors header, dtypes, shapes, every expected tensor),
//! and written atomically so a failed save never damages the directory's previous content.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
/// Model and tokenizer files are replaced atomically (see [`crate::files`]).
pub use crate::files::write_atomic;
use crate::resources::{try_zeroed, Bytes, Need};

use super::params::ParamStore;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

pub fn read_config_text(dir: &Path) -> Result<String> {
    let path = dir.join(CONFIG_FILE);
    fs::read_to_string(&path).map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))
}

/// Opens a safetensors file by memory map (zero copy) and parses its header.
pub struct SafetensorsFile {
    map: memmap2::Mmap,
    path: String,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = fs::File::open(path).map_err(|e| Error::Io(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the map is read-only; a file truncated underneath us by another process is
        // the one case memmap cannot guard against, as with every mmap reader.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::Io(format!("cannot map {}: {e}", path.display())))?;
        let this = SafetensorsFile { map, path: path.display().to_string() };
        this.parse()?;
        Ok(this)
    }

    pub fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map)
            .map_err(|e| Error::Format(format!("{} is not a valid safetensors file: {e}", self.path)))
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The string metadata of the header (`__metadata__`), empty when there is none.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, header) = SafeTensors::read_metadata(&self.map)
            .map_err(|e| Error::Format(format!("{} is not a valid safetensors file: {e}", self.path)))?;
        Ok(header.metadata().clone().unwrap_or_default())
    }
}

/// Converts a stored tensor to f32 (F32, F16, BF16 and F64 are accepted).
pub fn tensor_to_f32(view: &TensorView<'_>, name: &str, out: &mut [f32]) -> Result<()> {
    let bytes = view.data();
    let n = out.len();
    match view.dtype() {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
            }
        }
        // BatchNorm's `num_batches_tracked` counter (an int64 buffer in PyTorch).
        Dtype::I64 if name.ends_with("num_batches_tracked") => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
            }
        }
        other => bail!(Format, "tensor {name} has dtype {other:?}; expected a float type"),
    }
    let want_bytes = n * view.dtype().bitsize() / 8;
    ensure!(bytes.len() == want_bytes, Format, "tensor {name}: {} bytes for {n} values", bytes.len());
    Ok(())
}

/// Fills every exported entry of `store` from the safetensors file at `path`.
/// `alt_prefix` is tried too (a `BeitModel` checkpoint saved under `beit.` or without it).
pub fn load_weights(store: &mut ParamStore, path: &Path) -> Result<()> {
    load_weights_named(store, path, |name| {
        let mut c = vec![name.to_string(), format!("beit.{name}"), name.trim_start_matches("beit.").to_string()];
        // A segmentation head saved with transformers 5's in-memory names.
        c.extend(super::segmentation::layout::hf5_name(name));
        c
    })
}

/// Fills every exported entry of `store` from the safetensors file at `path`, taking for each
/// entry the first of `candidates(name)` the file holds; shapes must match exactly.
pub fn load_weights_named(store: &mut ParamStore, path: &Path, candidates: impl Fn(&str) -> Vec<String>) -> Result<()> {
    let file = SafetensorsFile::open(path)?;
    let st = file.parse()?;
    let names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    for i in 0..store.specs.len() {
        let spec = store.specs[i].clone();
        if !spec.exported {
            continue;
        }
        let Some(found) = candidates(&spec.name).into_iter().find(|c| names.contains(c)) else {
            bail!(Format, "{} has no tensor {:?}, which this config needs", file.path(), spec.name);
        };
        let view = st.tensor(&found).map_err(|e| Error::Format(format!("tensor {found}: {e}")))?;
        ensure!(
            view.shape() == spec.shape.as_slice(),
            Format,
            "tensor {found} in {} has shape {:?}; the config needs {:?}",
            file.path(),
            view.shape(),
            spec.shape
        );
        let (offset, len) = (spec.offset, spec.len);
        let values = &mut store.data[offset..offset + len];
        tensor_to_f32(&view, &found, values)?;
        // A NaN or an infinity would make every output NaN without any error: refuse the file.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(Format, "tensor {found} in {} holds {} at index {i}: weights must be finite", file.path(), values[i]);
        }
    }
    Ok(())
}

/// Serialises named f32 tensors as safetensors with `{"format": "pt"}` metadata (transformers
/// refuses weight files without it).
pub fn f32_tensors_bytes<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>) -> Result<Vec<u8>> {
    f32_tensors_bytes_with_metadata(tensors, HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// Serialises named f32 tensors as safetensors with the given string metadata.
pub fn f32_tensors_bytes_with_metadata<'a, N: AsRef<str> + 'a>(
    tensors: impl IntoIterator<Item = (N, &'a [usize], &'a [f32])>,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, shape, data)| {
            (n.as_ref().to_string(), shape.to_vec(), data.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect();
    let views = owned
        .iter()
        .map(|(n, shape, b)| {
            TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::Internal(format!("serialising tensors: {e}")))
}

pub fn weights_bytes(store: &ParamStore) -> Result<Vec<u8>> {
    let counters = store.specs.iter().any(|s| s.exported && s.name.ends_with("num_batches_tracked"));
    if !counters {
        return f32_tensors_bytes(
            store
                .specs
                .iter()
                .filter(|s| s.exported)
                .map(|s| (s.name.as_str(), s.shape.as_slice(), &store.data[s.offset..s.offset + s.len])),
        );
    }
    // BatchNorm counters are int64 in PyTorch; transformers would refuse a float one.
    let owned: Vec<(&str, Dtype, &[usize], Vec<u8>)> = store
        .specs
        .iter()
        .filter(|s| s.exported)
        .map(|s| {
            let values = &store.data[s.offset..s.offset + s.len];
            if s.name.ends_with("num_batches_tracked") {
                (
                    s.name.as_str(),
                    Dtype::I64,
                    s.shape.as_slice(),
                    values.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect(),
                )
            } else {
                (s.name.as_str(), Dtype::F32, s.shape.as_slice(), values.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
        })
        .collect();
    let views = owned
        .iter()
        .map(|(n, dtype, shape, b)| {
            TensorView::new(*dtype, shape.to_vec(), b)
                .map(|v| (n.to_string(), v))
                .map_err(|e| Error::Internal(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, Some(HashMap::from([("format".to_string(), "pt".to_string())])))
        .map_err(|e| Error::Internal(format!("serialising tensors: {e}")))
}

/// A tensor read from a safetensors file: its shape and its values converted to f32.
pub fn read_f32(st: &SafeTensors<'_>, name: &str) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    let view = match st.tensor(name) {
        Ok(v) => v,
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
        Err(e) => bail!(Format, "tensor {name}: {e}"),
    };
    let n = crate::tensor::checked_numel(view.shape())
        .ok_or_else(|| Error::Format(format!("tensor {name} is too large")))?;
    // The file holds the values in any width (f16 takes half of f32): read as f32 they may need
    // more memory than the file has bytes.
    Need::new(format!("tensor {name} as f32 ({n} values)"), Bytes::floats(&[n])).check()?;
    let mut out = try_zeroed(n, name)?;
    tensor_to_f32(&view, name, &mut out)?;
    Ok(Some((view.shape().to_vec(), out)))
}

/// A mask tensor (u8, bool, or any integer type) read as 0/1 bytes; other values are an error.
pub fn read_mask(st: &SafeTensors<'_>, name: &str) -> Result<Option<(Vec<usize>, Vec<u8>)>> {
    let view = match st.tensor(name) {
        Ok(v) => v,
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
        Err(e) => bail!(Format, "tensor {name}: {e}"),
    };
    let width = match view.dtype() {
        Dtype::U8 | Dtype::BOOL | Dtype::I8 => 1,
        Dtype::I32 | Dtype::U32 => 4,
        Dtype::I64 | Dtype::U64 => 8,
        other => bail!(Format, "tensor {name} has dtype {other:?}; expected bool, u8 or an integer type"),
    };
    let n = view.data().len() / width;
    Need::new(format!("tensor {name} as a mask ({n} values)"), Bytes::of::<u8>(&[n])).check()?;
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| Error::InvalidArgument(format!("cannot allocate tensor {name}")))?;
    for c in view.data().chunks_exact(width) {
        let nonzero = c.iter().any(|&b| b != 0);
        let one = c[0] == 1 && c[1..].iter().all(|&b| b == 0);
        ensure!(!nonzero || one, Format, "tensor {name} must hold only 0 and 1");
        out.push(one as u8);
    }
    Ok(Some((view.shape().to_vec(), out)))
}

/// An integer tensor (any signed or unsigned integer dtype) read as i64.
pub fn read_i64(st: &SafeTensors<'_>, name: &str) -> Result<Option<(Vec<usize>, Vec<i64>)>> {
    let view = match st.tensor(name) {
        Ok(v) => v,
        Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
        Err(e) => bail!(Format, "tensor {name}: {e}"),
    };
    let data = view.data();
    let out: Vec<i64> = match view.dtype() {
        Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::U64 => data
            .chunks_exact(8)
            .map(|c| i64::try_from(u64::from_le_bytes(c.try_into().unwrap())).unwrap_or(i64::MAX))
            .collect(),
        Dtype::I32 => data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::U32 => data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::I16 => data.chunks_exact(2).map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::U16 => data.chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        Dtype::U8 => data.iter().map(|&b| b as i64).collect(),
        Dtype::I8 => data.iter().map(|&b| b as i8 as i64).collect(),
        other => bail!(Format, "tensor {name} has dtype {other:?}; expected an integer type"),
    };
    Ok(Some((view.shape().to_vec(), out)))
}
