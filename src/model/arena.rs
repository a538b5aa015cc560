//! One planned buffer for all activations of a pass. A plan hands out slots (offset + length)
//! before anything runs; the arena is allocated once and reused by every pass of the same shape,
//! so a forward pass performs no allocation per op.

use crate::error::{Error, Result};

/// A region of the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    offset: usize,
    len: usize,
}

impl Slot {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Hands out non-overlapping slots, 64-byte aligned (16 floats) so rows start on cache lines.
#[derive(Debug, Default, Clone)]
pub struct ArenaPlan {
    total: usize,
}

impl ArenaPlan {
    pub fn slot(&mut self, len: usize) -> Slot {
        let offset = self.total.div_ceil(16) * 16;
        self.total = offset + len;
        Slot { offset, len }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

/// The arena's memory: zeroed anonymous pages, with the kernel asked for transparent huge pages
/// (`MADV_HUGEPAGE`, what `madvise` mode grants on request). Training arenas are hundreds of MB
/// streamed by every GEMM; with 4 KB pages their TLB misses made step times vary by a third
/// from one process to the next.
struct Buffer {
    map: Option<memmap2::MmapMut>,
    len: usize,
}

impl Buffer {
    /// Maps `len` zeroed floats; an error (never a panic or an abort) when the system refuses.
    /// Callers test the size against the memory budget first (`crate::resources`).
    fn zeroed(len: usize) -> Result<Self> {
        if len == 0 {
            return Ok(Buffer { map: None, len });
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
        Ok(Buffer { map: Some(map), len })
    }

    fn as_slice(&self) -> &[f32] {
        match &self.map {
            // SAFETY: the map is page-aligned, `len` f32s long, zero-initialised, and lives as
            // long as `self`.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<f32>(), self.len) },
            None => &[],
        }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        match &mut self.map {
            // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
            Some(m) => unsafe { std::slice::from_raw_parts_mut(m.as_mut_ptr().cast::<f32>(), self.len) },
            None => &mut [],
        }
    }
}

pub struct Arena {
    buf: Buffer,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena").field("floats", &self.buf.len).finish()
    }
}

impl Arena {
    /// The arena of `plan`, zeroed; an error when the system refuses the memory.
    pub fn new(plan: &ArenaPlan) -> Result<Self> {
        Ok(Arena { buf: Buffer::zeroed(plan.total())? })
    }

    /// Number of f32 elements held.
    pub fn len(&self) -> usize {
        self.buf.len
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }

    pub fn get(&self, slot: Slot) -> &[f32] {
        &self.buf.as_slice()[slot.offset..slot.offset + slot.len]
    }

    pub fn get_mut(&mut self, slot: Slot) -> &mut [f32] {
        &mut self.buf.as_mut_slice()[slot.offset..slot.offset + slot.len]
    }

    /// Mutable views of several distinct slots at once.
    ///
    /// Panics if a slot is given twice. Slots from one plan never overlap, so distinct slots
    /// give disjoint slices.
    pub fn many_mut<const N: usize>(&mut self, slots: [Slot; N]) -> [&mut [f32]; N] {
        for i in 0..N {
            assert!(slots[i].offset + slots[i].len <= self.buf.len, "arena: slot outside the arena");
            for j in 0..i {
                assert!(slots[i] != slots[j] || slots[i].len == 0, "arena: slot requested twice");
            }
        }
        let base = self.buf.as_mut_slice().as_mut_ptr();
        // SAFETY: every slot lies inside the buffer (checked) and slots of one plan are disjoint.
        slots.map(|s| unsafe { std::slice::from_raw_parts_mut(base.add(s.offset), s.len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_and_aligned() {
        let mut plan = ArenaPlan::default();
        let a = plan.slot(5);
        let b = plan.slot(17);
        let mut arena = Arena::new(&plan).unwrap();
        let [x, y] = arena.many_mut([a, b]);
        x.fill(1.0);
        y.fill(2.0);
        assert!(arena.get(a).iter().all(|&v| v == 1.0));
        assert!(arena.get(b).iter().all(|&v| v == 2.0));
        assert_eq!(b.offset % 16, 0);
    }

    #[test]
    #[should_panic(expected = "twice")]
    fn same_slot_twice_panics() {
        let mut plan = ArenaPlan::default();
        let a = plan.slot(4);
        let mut arena = Arena::new(&plan).unwrap();
        let _ = arena.many_mut([a, a]);
    }
}
