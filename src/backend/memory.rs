//! The memory a pass addresses, as the passes see it: views (space + offset + length) handed out
//! by a planner before anything runs. A backend resolves a view to its own memory (a host slice
//! on the CPU, a device pointer on CUDA), so the pass is written once over [`super::Backend`]
//! and never holds a pointer.
//!
//! Five spaces: activations (`Act`: the backend's activation type, bf16 on a bf16 GPU run),
//! f32 statistics and scratch (`Stat`: layer norm statistics, attention probabilities or
//! log-sum-exps, bias tables, drop path factors, pixels), integer indices (`Index`: relative
//! position indices, masked rows, labels, masks), the parameters (`Param`, read only, laid out
//! like the model's flat parameter store) and their gradients (`Grad`, f32, same layout).
//!
//! [`HostMemory`] is the host's resolution of the five: the [`Arena`] (the `Act` and `Stat`
//! views of a host plan share its floats; `Index` views its indices), the parameters and the
//! gradient buffer.

use crate::error::{Error, Result};

/// Which memory a view points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    Act,
    Stat,
    Index,
    Param,
    Grad,
}

/// A region of one space, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct View {
    pub space: Space,
    pub offset: usize,
    pub len: usize,
}

impl View {
    pub const fn new(space: Space, offset: usize, len: usize) -> Self {
        View { space, offset, len }
    }

    /// An empty view: "not kept" (a branch output nobody reads, statistics a backend does not
    /// save).
    pub const fn empty(space: Space) -> Self {
        View { space, offset: 0, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `len` elements (a buffer planned for the largest use, used for a smaller one).
    pub fn prefix(self, len: usize) -> View {
        assert!(len <= self.len, "view: prefix of {len} from {}", self.len);
        View { len, ..self }
    }

    /// Elements `start..start + len`.
    pub fn sub(self, start: usize, len: usize) -> View {
        assert!(start + len <= self.len, "view: {start}+{len} outside {}", self.len);
        View { offset: self.offset + start, len, ..self }
    }

    /// `None` for an empty view.
    pub fn nonempty(self) -> Option<View> {
        (!self.is_empty()).then_some(self)
    }

    fn end(&self) -> usize {
        self.offset + self.len
    }

    /// Whether the two share an element (empty views share none).
    pub fn overlaps(&self, other: &View) -> bool {
        let same = self.space == other.space
            || matches!((self.space, other.space), (Space::Act, Space::Stat) | (Space::Stat, Space::Act));
        same && !self.is_empty() && !other.is_empty() && self.offset < other.end() && other.offset < self.end()
    }
}

/// Hands out non-overlapping views of the `Act` and `Stat` spaces. A shared planner puts both
/// spaces in one buffer (the host: both are f32), its views 64-byte aligned (16 floats) so rows
/// start on cache lines; a split one counts them apart (a device whose activations may be bf16),
/// its views aligned to 128 elements (256 bytes of bf16), so every view handed to a GEMM library
/// is as aligned as a fresh allocation.
#[derive(Debug, Clone)]
pub struct Planner {
    shared: bool,
    act: usize,
    stat: usize,
    index: usize,
}

impl Planner {
    /// One buffer for both spaces.
    pub fn shared() -> Self {
        Planner { shared: true, act: 0, stat: 0, index: 0 }
    }

    /// A buffer per space.
    pub fn split() -> Self {
        Planner { shared: false, act: 0, stat: 0, index: 0 }
    }

    /// Whether both spaces share one buffer.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Views start at multiples of this many elements.
    pub fn alignment(&self) -> usize {
        if self.shared {
            16
        } else {
            128
        }
    }

    fn take(total: &mut usize, align: usize, space: Space, len: usize) -> View {
        let offset = total.div_ceil(align) * align;
        *total = offset + len;
        View { space, offset, len }
    }

    /// A view of `len` activations.
    pub fn act(&mut self, len: usize) -> View {
        let align = self.alignment();
        Self::take(&mut self.act, align, Space::Act, len)
    }

    /// A view of `len` f32 statistics or scratch.
    pub fn stat(&mut self, len: usize) -> View {
        let align = self.alignment();
        let total = if self.shared { &mut self.act } else { &mut self.stat };
        Self::take(total, align, Space::Stat, len)
    }

    /// A view of `len` indices.
    pub fn index(&mut self, len: usize) -> View {
        let align = self.alignment();
        Self::take(&mut self.index, align, Space::Index, len)
    }

    /// Elements of the index buffer.
    pub fn index_total(&self) -> usize {
        self.index
    }

    /// Elements of the activation buffer (both spaces when shared).
    pub fn act_total(&self) -> usize {
        self.act
    }

    /// Elements of the statistics buffer (0 when shared).
    pub fn stat_total(&self) -> usize {
        self.stat
    }
}

/// The host's activation memory: zeroed anonymous pages, with the kernel asked for transparent
/// huge pages (`MADV_HUGEPAGE`, what `madvise` mode grants on request). Training arenas are
/// hundreds of MB streamed by every GEMM; with 4 KB pages their TLB misses made step times vary
/// by a third from one process to the next.
pub struct Arena {
    map: Option<memmap2::MmapMut>,
    len: usize,
    index: Vec<usize>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("floats", &self.len).finish()
    }
}

impl Arena {
    /// The arena of a shared `plan`, zeroed; an error (never a panic or an abort) when the
    /// system refuses. Callers test the size against the memory budget first
    /// (`crate::resources`).
    pub fn new(plan: &Planner) -> Result<Self> {
        assert!(plan.shared, "a host arena holds a shared plan");
        let len = plan.act_total();
        let mut index = Vec::new();
        index.try_reserve_exact(plan.index_total()).map_err(|_| {
            Error::InvalidArgument(format!("cannot allocate {} indices of a pass: out of memory", plan.index_total()))
        })?;
        index.resize(plan.index_total(), 0);
        if len == 0 {
            return Ok(Arena { map: None, len, index });
        }
        let refused =
            |why: String| Error::InvalidArgument(format!("cannot map an activation arena of {len} floats: {why}"));
        let bytes = len.checked_mul(std::mem::size_of::<f32>()).ok_or_else(|| refused("too large".into()))?;
        let map = memmap2::MmapMut::map_anon(bytes).map_err(|e| refused(e.to_string()))?;
        #[cfg(target_os = "linux")]
        {
            // Advice only: where huge pages are off or unavailable the kernel says no and the
            // arena works the same with small pages.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Arena { map: Some(map), len, index })
    }

    /// Number of f32 elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (floats and indices).
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<f32>() + self.index.len() * std::mem::size_of::<usize>()
    }

    fn base(&mut self) -> *mut f32 {
        match &mut self.map {
            Some(m) => m.as_mut_ptr().cast::<f32>(),
            None => std::ptr::NonNull::dangling().as_ptr(),
        }
    }

    fn check(&self, v: View) {
        assert!(matches!(v.space, Space::Act | Space::Stat), "arena: a {:?} view", v.space);
        assert!(v.end() <= self.len, "arena: view outside the arena");
    }

    pub fn get(&self, v: View) -> &[f32] {
        self.check(v);
        match &self.map {
            // SAFETY: the map is page-aligned, `len` f32s long, zero-initialised, lives as long
            // as `self`, and the view lies inside it (checked).
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<f32>().add(v.offset), v.len) },
            None => &[],
        }
    }

    pub fn get_mut(&mut self, v: View) -> &mut [f32] {
        let [s] = self.many_mut([v]);
        s
    }

    /// The indices of an `Index` view.
    pub fn indices(&self, v: View) -> &[usize] {
        assert!(v.space == Space::Index, "arena: a {:?} view read as indices", v.space);
        &self.index[v.offset..v.end()]
    }

    /// The indices of an `Index` view, to fill.
    pub fn indices_mut(&mut self, v: View) -> &mut [usize] {
        assert!(v.space == Space::Index, "arena: a {:?} view written as indices", v.space);
        &mut self.index[v.offset..v.end()]
    }

    /// Mutable slices of several disjoint views at once. Panics if two overlap (views of one
    /// plan never do; the same view twice does).
    pub fn many_mut<const N: usize>(&mut self, views: [View; N]) -> [&mut [f32]; N] {
        for i in 0..N {
            self.check(views[i]);
            for j in 0..i {
                assert!(!views[i].overlaps(&views[j]), "arena: a view requested twice");
            }
        }
        let base = self.base();
        // SAFETY: every view lies inside the buffer (checked) and they are pairwise disjoint.
        views.map(|v| unsafe { std::slice::from_raw_parts_mut(base.add(v.offset), v.len) })
    }
}

/// The host's memory for one pass: the activation arena, the parameters (read only) and the
/// gradient buffer (empty for inference).
pub struct HostMemory<'a> {
    pub arena: &'a mut Arena,
    pub params: &'a [f32],
    pub grads: &'a mut [f32],
    /// The sum of the losses the loss ops computed since the last `take_loss`.
    pub loss: f64,
}

impl<'a> HostMemory<'a> {
    pub fn new(arena: &'a mut Arena, params: &'a [f32], grads: &'a mut [f32]) -> Self {
        HostMemory { arena, params, grads, loss: 0.0 }
    }

    /// Slices for `W` views written and `R` views read by one op. Panics if a written view is a
    /// parameter, lies outside its space, or overlaps any other view of the op; reads may
    /// overlap each other. Empty views give empty slices.
    pub fn split<const W: usize, const R: usize>(
        &mut self,
        writes: [View; W],
        reads: [View; R],
    ) -> ([&mut [f32]; W], [&[f32]; R]) {
        for (i, w) in writes.iter().enumerate() {
            assert!(w.space != Space::Param, "host memory: an op writes a parameter");
            for o in writes[..i].iter().chain(reads.iter()) {
                assert!(!w.overlaps(o), "host memory: a written view overlaps another view of the op");
            }
        }
        let arena_base = self.arena.base();
        let grads_base = self.grads.as_mut_ptr();
        let resolve = |v: View| -> *mut f32 {
            match v.space {
                Space::Act | Space::Stat => {
                    self.arena.check(v);
                    // SAFETY: inside the arena (checked).
                    unsafe { arena_base.add(v.offset) }
                }
                Space::Grad => {
                    assert!(v.end() <= self.grads.len(), "host memory: gradient view outside the buffer");
                    // SAFETY: inside the gradient buffer (checked).
                    unsafe { grads_base.add(v.offset) }
                }
                Space::Index => panic!("host memory: an index view read as floats"),
                Space::Param => {
                    assert!(v.end() <= self.params.len(), "host memory: parameter view outside the store");
                    // SAFETY: inside the parameters (checked); only read (writes refused above).
                    unsafe { self.params.as_ptr().add(v.offset) as *mut f32 }
                }
            }
        };
        let empty = |v: &View| v.is_empty();
        // SAFETY: each pointer is in bounds for its view's length (checked in `resolve`); the
        // written views are disjoint from each other and from every read view (checked above),
        // and `&mut self` holds the arena and gradients exclusively for the slices' lifetime.
        let w = writes.map(|v| {
            if empty(&v) {
                &mut [][..]
            } else {
                unsafe { std::slice::from_raw_parts_mut(resolve(v), v.len) }
            }
        });
        let r =
            reads.map(|v| if empty(&v) { &[][..] } else { unsafe { std::slice::from_raw_parts(resolve(v), v.len) } });
        (w, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_disjoint_and_aligned() {
        let mut plan = Planner::shared();
        let a = plan.act(5);
        let b = plan.stat(17);
        let mut arena = Arena::new(&plan).unwrap();
        let [x, y] = arena.many_mut([a, b]);
        x.fill(1.0);
        y.fill(2.0);
        assert!(arena.get(a).iter().all(|&v| v == 1.0));
        assert!(arena.get(b).iter().all(|&v| v == 2.0));
        assert_eq!(b.offset % 16, 0);
        let mut split = Planner::split();
        let (a, b) = (split.act(5), split.stat(3));
        assert_eq!((a.offset, b.offset, split.act_total(), split.stat_total()), (0, 0, 5, 3));
        assert_eq!(split.act(1).offset, 128);
    }

    #[test]
    #[should_panic(expected = "twice")]
    fn same_view_twice_panics() {
        let mut plan = Planner::shared();
        let a = plan.act(4);
        let mut arena = Arena::new(&plan).unwrap();
        let _ = arena.many_mut([a, a]);
    }

    #[test]
    #[should_panic(expected = "overlaps")]
    fn host_memory_refuses_a_write_over_a_read() {
        let mut plan = Planner::shared();
        let a = plan.act(8);
        let mut arena = Arena::new(&plan).unwrap();
        let mut grads = [];
        let mut m = HostMemory::new(&mut arena, &[], &mut grads);
        let _ = m.split([a.sub(0, 4)], [a.sub(2, 4)]);
    }

    #[test]
    fn host_memory_resolves_every_space() {
        let mut plan = Planner::shared();
        let a = plan.act(2);
        let mut arena = Arena::new(&plan).unwrap();
        let params = [1.0, 2.0, 3.0];
        let mut grads = [0.0; 3];
        let mut m = HostMemory::new(&mut arena, &params, &mut grads);
        let ([act, g], [p]) = m.split([a, View::new(Space::Grad, 1, 2)], [View::new(Space::Param, 1, 2)]);
        act.copy_from_slice(p);
        g.copy_from_slice(p);
        assert_eq!(grads, [0.0, 2.0, 3.0]);
        assert_eq!(arena.get(a), &[2.0, 3.0]);
    }
}
