//! The flat parameter buffer and its table of named, shaped entries ([`ParamStore`]), and the
//! [`Builder`] that lays one out. Below both `params` (the backbone's layout) and
//! `segmentation::layout` (the UperNet head's), which each add their entries through it.

use crate::backend::memory::{Space, View};
use crate::error::{Error, Result};

/// How a fresh model initialises an entry (BeitConfig-driven, unilm's scheme).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f32),
    /// Normal(0, std) truncated to ±`bound` (absolute), then multiplied by `scale` (the per-layer
    /// rescaling of output projections, and the 0.001 of a fresh classifier).
    TruncNormal {
        std: f32,
        scale: f32,
        bound: f32,
    },
    /// Normal(0, std), untruncated (PyTorch `normal_`; the DALL-E convolutions' init).
    Normal {
        std: f32,
    },
}

/// One named tensor inside the flat buffer.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Hugging Face name, e.g. `beit.encoder.layer.0.attention.attention.query.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    pub init: Init,
    /// False for the internal zero key bias that only exists to make the fused QKV bias
    /// contiguous: it is never saved, loaded or trained.
    pub exported: bool,
}

/// Index of an entry in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamId(pub usize);

#[derive(Debug, Clone)]
pub struct ParamStore {
    pub data: Vec<f32>,
    pub specs: Vec<ParamSpec>,
}

impl ParamStore {
    pub fn get(&self, id: ParamId) -> &[f32] {
        let s = &self.specs[id.0];
        &self.data[s.offset..s.offset + s.len]
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut [f32] {
        let s = &self.specs[id.0];
        &mut self.data[s.offset..s.offset + s.len]
    }

    /// The contiguous span from the start of `first` to the end of `last`.
    pub fn span(&self, first: ParamId, last: ParamId) -> &[f32] {
        let (a, b) = (&self.specs[first.0], &self.specs[last.0]);
        &self.data[a.offset..b.offset + b.len]
    }

    /// Where parameter `id` lies in the flat store, as a `Param` view for a pass (its gradient:
    /// [`ParamStore::grad_view`]; the gradient buffer has the store's layout).
    pub fn view(&self, id: ParamId) -> View {
        let s = &self.specs[id.0];
        View::new(Space::Param, s.offset, s.len)
    }

    /// [`ParamStore::span`] as a `Param` view.
    pub fn span_view(&self, first: ParamId, last: ParamId) -> View {
        let (a, b) = (&self.specs[first.0], &self.specs[last.0]);
        View::new(Space::Param, a.offset, b.offset + b.len - a.offset)
    }

    /// The gradient of parameter `id`, as a `Grad` view.
    pub fn grad_view(&self, id: ParamId) -> View {
        View { space: Space::Grad, ..self.view(id) }
    }

    /// The gradient of [`ParamStore::span`], as a `Grad` view.
    pub fn grad_span_view(&self, first: ParamId, last: ParamId) -> View {
        View { space: Space::Grad, ..self.span_view(first, last) }
    }

    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.specs.iter().position(|s| s.name == name).map(ParamId)
    }

    /// An empty store, for layouts built outside this module (the tokenizer's).
    pub fn empty() -> Self {
        ParamStore { data: Vec::new(), specs: Vec::new() }
    }

    /// Appends a zero-filled, exported entry and returns its id.
    pub fn push(&mut self, name: String, shape: &[usize], init: Init) -> ParamId {
        let len = shape.iter().product();
        let offset = self.data.len();
        self.specs.push(ParamSpec { name, shape: shape.to_vec(), offset, len, init, exported: true });
        self.data.resize(offset + len, 0.0);
        ParamId(self.specs.len() - 1)
    }

    /// The exported entries in layout order: the parameters a Hugging Face checkpoint holds,
    /// under their names there.
    pub fn exported(&self) -> impl Iterator<Item = &ParamSpec> {
        self.specs.iter().filter(|s| s.exported)
    }

    /// The exported entry named `name` (its Hugging Face name).
    pub fn find_exported(&self, name: &str) -> Result<ParamId> {
        self.specs.iter().position(|s| s.exported && s.name == name).map(ParamId).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "this model has no parameter named {name:?} (the names are Hugging Face's, e.g. {:?})",
                self.exported().next().map_or("", |s| s.name.as_str())
            ))
        })
    }

    /// Sets the values of the exported entry `name` from `values` (its length, all finite).
    /// On error nothing changes.
    pub fn set_named(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let id = self.find_exported(name)?;
        let spec = &self.specs[id.0];
        ensure!(
            values.len() == spec.len,
            InvalidArgument,
            "{name} has shape {:?} ({} values); {} values were given",
            spec.shape,
            spec.len,
            values.len()
        );
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(InvalidArgument, "{name}: value {i} is {}; parameters must be finite", values[i]);
        }
        self.get_mut(id).copy_from_slice(values);
        Ok(())
    }

    /// Copies every exported entry of `src`, which must have the same entries (names and
    /// shapes, in the same order). On error nothing changes.
    pub fn copy_exported_from(&mut self, src: &ParamStore) -> Result<()> {
        let (mine, theirs): (Vec<_>, Vec<_>) = (self.exported().collect(), src.exported().collect());
        for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
            ensure!(
                a.name == b.name && a.shape == b.shape,
                InvalidArgument,
                "the models' parameters differ at entry {i}: {} {:?} here, {} {:?} in the source",
                a.name,
                a.shape,
                b.name,
                b.shape
            );
        }
        ensure!(
            mine.len() == theirs.len(),
            InvalidArgument,
            "the models hold {} and {} parameters: copying needs the same layout",
            mine.len(),
            theirs.len()
        );
        let ranges: Vec<(usize, usize, usize)> =
            mine.iter().zip(&theirs).map(|(a, b)| (a.offset, b.offset, a.len)).collect();
        for (to, from, len) in ranges {
            self.data[to..to + len].copy_from_slice(&src.data[from..from + len]);
        }
        Ok(())
    }

    /// Number of exported (real) parameters.
    pub fn count(&self) -> usize {
        self.specs.iter().filter(|s| s.exported).map(|s| s.len).sum()
    }
}

/// A weight/bias pair (layer norm or linear).
#[derive(Debug, Clone, Copy)]
pub struct Affine {
    pub weight: ParamId,
    pub bias: ParamId,
}

/// Collects the parameter table of a model while its layout is built (`super::params` for the
/// backbone and standard heads, `super::segmentation::layout` for UperNet): entries are appended in
/// order, each at the running offset of the flat buffer.
pub(crate) struct Builder {
    pub(crate) specs: Vec<ParamSpec>,
    pub(crate) total: usize,
    pub(crate) prefix: &'static str,
}

impl Builder {
    pub(crate) fn add(&mut self, name: &str, shape: &[usize], init: Init) -> ParamId {
        self.push(format!("{}{name}", self.prefix), shape, init, true)
    }

    pub(crate) fn add_top(&mut self, name: &str, shape: &[usize], init: Init) -> ParamId {
        self.push(name.to_string(), shape, init, true)
    }

    pub(crate) fn push(&mut self, name: String, shape: &[usize], init: Init, exported: bool) -> ParamId {
        // Saturating: a config too large for usize arithmetic gets a total of usize::MAX, which
        // the budget test in `build_layout` refuses before anything is allocated.
        let len = crate::tensor::checked_numel(shape).unwrap_or(usize::MAX);
        self.specs.push(ParamSpec { name, shape: shape.to_vec(), offset: self.total, len, init, exported });
        self.total = self.total.saturating_add(len);
        ParamId(self.specs.len() - 1)
    }

    pub(crate) fn layernorm(&mut self, name: &str, d: usize, top: bool) -> Affine {
        let (w, b) = (format!("{name}.weight"), format!("{name}.bias"));
        if top {
            Affine { weight: self.add_top(&w, &[d], Init::Ones), bias: self.add_top(&b, &[d], Init::Zeros) }
        } else {
            Affine { weight: self.add(&w, &[d], Init::Ones), bias: self.add(&b, &[d], Init::Zeros) }
        }
    }
}
