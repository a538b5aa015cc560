//! The resource model. libbeit runs inside other people's processes, so a config, a checkpoint,
//! an option or an input must never make it ask the allocator for more than it can have: Rust
//! aborts the whole process when an allocation fails. Every object whose size comes from outside
//! (a model, a trainer, a pass over a batch, a loader, a tokenizer, an importer's output, an
//! evaluation's tables) is therefore sized first, with overflow-checked arithmetic ([`Bytes`]),
//! and tested against the memory budget ([`Need::check`]) before anything is allocated. What does
//! not fit is an error that names the object, the size and the budget.
//!
//! The budget is what one such object may need, not a running total: by default the memory this
//! process can still get ([`available_memory`]: the kernel's `MemAvailable`, the address-space
//! rlimit and the cgroup limit, whichever is smallest), or a number the host sets on its context
//! (`beit_context_options.memory_budget`, `beit --memory-budget`). A context runs its work inside
//! [`with_budget`], so code deep in a pass reads the budget of the context it runs on with
//! [`current`] and needs no extra parameter; code outside any context gets the default.
//!
//! Beside the budget there are absolute caps ([`MAX_DIM`] and friends): values no real BEiT comes
//! near, which keep every product of them far from overflowing 64 bits.
//!
//! Allocations that pass the test still go through [`try_zeroed`] / [`try_filled`] where they are
//! large, so that a budget estimate below the truth (or a limit the budget cannot see) is an
//! error too, never an abort.

use std::cell::Cell;
use std::fmt;

use crate::error::{Error, Result};

/// Largest `hidden_size`, `intermediate_size`, head width or channel count of a layer.
pub const MAX_DIM: usize = 1 << 16;
/// Largest `num_hidden_layers`.
pub const MAX_LAYERS: usize = 1024;
/// Largest `vocab_size` (the visual codebook; DALL-E's is 8,192).
pub const MAX_VOCAB: usize = 1 << 24;
/// Largest number of classes (`num_labels`, a dataset's label values, a confusion matrix side).
pub const MAX_LABELS: usize = 1 << 20;
/// Largest number of input channels of an image.
pub const MAX_CHANNELS: usize = 4096;
/// Largest image side, in pixels.
pub const MAX_IMAGE_SIDE: usize = 1 << 16;
/// Most worker threads of a loader.
pub const MAX_LOADER_WORKERS: usize = 256;

/// A byte count computed with overflow-checked arithmetic: once a step overflows it stays
/// "more than 2^64 bytes" (`None`), which no budget admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bytes(Option<u64>);

impl Bytes {
    pub const ZERO: Bytes = Bytes(Some(0));

    /// Exactly `n` bytes.
    pub fn new(n: u64) -> Bytes {
        Bytes(Some(n))
    }

    /// The bytes of a `T` array of shape `dims`.
    pub fn of<T>(dims: &[usize]) -> Bytes {
        dims.iter().try_fold(std::mem::size_of::<T>() as u64, |acc, &d| acc.checked_mul(d as u64)).into()
    }

    /// The bytes of an f32 array of shape `dims`.
    pub fn floats(dims: &[usize]) -> Bytes {
        Self::of::<f32>(dims)
    }

    /// The count, or `None` when the arithmetic overflowed.
    pub fn get(self) -> Option<u64> {
        self.0
    }
}

impl From<Option<u64>> for Bytes {
    fn from(v: Option<u64>) -> Self {
        Bytes(v)
    }
}

impl std::ops::Add for Bytes {
    type Output = Bytes;
    fn add(self, rhs: Bytes) -> Bytes {
        Bytes(self.0.zip(rhs.0).and_then(|(a, b)| a.checked_add(b)))
    }
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, rhs: Bytes) {
        *self = *self + rhs;
    }
}

impl std::ops::Mul<usize> for Bytes {
    type Output = Bytes;
    fn mul(self, rhs: usize) -> Bytes {
        Bytes(self.0.and_then(|a| a.checked_mul(rhs as u64)))
    }
}

impl std::iter::Sum for Bytes {
    fn sum<I: Iterator<Item = Bytes>>(iter: I) -> Bytes {
        iter.fold(Bytes::ZERO, |a, b| a + b)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => f.write_str(&human(n)),
            None => f.write_str("more than 2^64 bytes"),
        }
    }
}

/// `n` bytes for a person: "1.5 GiB", "12 KiB", "512 bytes".
pub fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// How much memory one object may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MemoryBudget {
    /// What the process can still get when the object is planned ([`available_memory`]).
    #[default]
    Available,
    /// A fixed number of bytes, set by the host.
    Bytes(u64),
}

impl MemoryBudget {
    /// The limit in bytes now, and a phrase saying where it comes from.
    pub fn limit(self) -> (u64, &'static str) {
        match self {
            MemoryBudget::Available => (available_memory(), "the memory available to this process"),
            MemoryBudget::Bytes(n) => (n, "the memory budget set for this context"),
        }
    }

    /// Parses a budget as the CLI takes it: `available`, or a byte count with an optional binary
    /// suffix (`512M`, `8G`, `1.5T`, `65536`; K, M, G, T mean KiB, MiB, GiB, TiB).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("available") {
            return Ok(MemoryBudget::Available);
        }
        let bad = || {
            Error::InvalidArgument(format!(
                "memory budget {text:?}: expected `available` or a size such as 512M, 8G or 1073741824"
            ))
        };
        let (number, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        let value: f64 = number.trim().parse().map_err(|_| bad())?;
        let bytes = value * (1u64 << shift) as f64;
        ensure!(
            value.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64,
            InvalidArgument,
            "memory budget {text:?} must be at least one byte and below 2^64"
        );
        Ok(MemoryBudget::Bytes(bytes as u64))
    }
}

thread_local! {
    /// The budget of the context whose work runs on this thread (see [`with_budget`]).
    static SCOPE: Cell<Option<MemoryBudget>> = const { Cell::new(None) };
}

/// The budget that applies on this thread: that of the innermost [`with_budget`], else
/// [`MemoryBudget::Available`].
pub fn current() -> MemoryBudget {
    SCOPE.with(|s| s.get()).unwrap_or_default()
}

/// Runs `f` with `budget` as this thread's [`current`] budget (restored afterwards, also when
/// `f` panics).
pub fn with_budget<R>(budget: MemoryBudget, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<MemoryBudget>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = SCOPE.try_with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SCOPE.with(|s| s.replace(Some(budget))));
    f()
}

/// What one object will need, to be tested against the current budget before it is allocated.
#[must_use = "a Need does nothing until it is checked"]
pub struct Need {
    what: String,
    bytes: Bytes,
    hint: Option<String>,
}

impl Need {
    /// `what` names the object for the message, e.g. "the parameters of this config".
    pub fn new(what: impl Into<String>, bytes: Bytes) -> Self {
        Need { what: what.into(), bytes, hint: None }
    }

    /// A sentence added to the refusal, e.g. how to process a large input in pieces.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    fn refusal(&self) -> Option<String> {
        let (limit, source) = current().limit();
        if self.bytes.get().is_some_and(|n| n <= limit) {
            return None;
        }
        let mut m = format!("{} would need {}, more than {source} ({})", self.what, self.bytes, human(limit));
        if let Some(h) = &self.hint {
            m.push_str("; ");
            m.push_str(h);
        }
        Some(m)
    }

    /// `Error::InvalidArgument` when it does not fit: for sizes that come from arguments,
    /// options and inputs.
    pub fn check(self) -> Result<()> {
        match self.refusal() {
            None => Ok(()),
            Some(m) => Err(Error::InvalidArgument(m)),
        }
    }

    /// `Error::Config` when it does not fit: for sizes that come from a model config.
    pub fn check_config(self) -> Result<()> {
        match self.refusal() {
            None => Ok(()),
            Some(m) => Err(Error::Config(m)),
        }
    }
}

/// Types whose all-zero bit pattern is a valid value (so a zeroed allocation is initialised).
///
/// # Safety
/// Implement only for types for which every byte being 0 is a valid value.
pub unsafe trait ZeroBits: Copy {}
// SAFETY: zero is a valid value of every primitive number type.
unsafe impl ZeroBits for f32 {}
// SAFETY: as above.
unsafe impl ZeroBits for f64 {}
// SAFETY: as above.
unsafe impl ZeroBits for u8 {}
// SAFETY: as above.
unsafe impl ZeroBits for u16 {}
// SAFETY: as above.
unsafe impl ZeroBits for u32 {}
// SAFETY: as above.
unsafe impl ZeroBits for u64 {}
// SAFETY: as above.
unsafe impl ZeroBits for i64 {}
// SAFETY: as above.
unsafe impl ZeroBits for usize {}

fn out_of_memory<T>(len: usize, what: &str) -> Error {
    Error::InvalidArgument(format!(
        "cannot allocate {} for {what}: the system refused the memory",
        Bytes::of::<T>(&[len])
    ))
}

/// A zeroed `Vec` of `len` elements, or an error (never an abort) when the allocator refuses.
/// Zeroed pages come from the kernel untouched, as with `vec![0; n]`.
pub fn try_zeroed<T: ZeroBits>(len: usize, what: &str) -> Result<Vec<T>> {
    if len == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| out_of_memory::<T>(len, what))?;
    // SAFETY: the layout has a non-zero size (len > 0, T not zero-sized).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(out_of_memory::<T>(len, what));
    }
    // SAFETY: `ptr` was allocated by the global allocator with exactly the layout of a
    // `Vec<T>` of capacity `len`, and all `len` elements are initialised (zero is a valid T).
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// A `Vec` of `len` copies of `value`, or an error (never an abort) when the allocator refuses.
pub fn try_filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| out_of_memory::<T>(len, what))?;
    v.resize(len, value);
    Ok(v)
}

/// The memory this process can still get, in bytes: the smallest of the kernel's
/// `MemAvailable`, the address-space rlimit less what is mapped already, and the cgroup's
/// memory limit less its usage. `u64::MAX` where none of them can be read (then only the
/// absolute caps and [`try_zeroed`] stand between a request and the allocator).
pub fn available_memory() -> u64 {
    let mut best = u64::MAX;
    if let Some(n) = proc_kib("/proc/meminfo", "MemAvailable:") {
        best = best.min(n);
    }
    if let Some(limit) = address_space_limit() {
        let mapped = proc_kib("/proc/self/status", "VmSize:").unwrap_or(0);
        best = best.min(limit.saturating_sub(mapped));
    }
    if let Some(room) = cgroup_room() {
        best = best.min(room);
    }
    best
}

/// A `<key> <n> kB` line of a /proc file, in bytes.
fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The soft `RLIMIT_AS` (what `prlimit --as` and `ulimit -v` set), when there is one.
fn address_space_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max address space"))?;
    line["Max address space".len()..].split_whitespace().next()?.parse().ok()
}

/// cgroup v2's `memory.max - memory.current` of this process's cgroup (v1's
/// `limit_in_bytes - usage_in_bytes` as a fallback), when limited.
fn cgroup_room() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)));
    if let Some(path) = own {
        let dir = format!("/sys/fs/cgroup{}", path.trim_end_matches('/'));
        if let Some(max) = read(&format!("{dir}/memory.max")) {
            return Some(max.saturating_sub(read(&format!("{dir}/memory.current")).unwrap_or(0)));
        }
    }
    let limit = read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?;
    // v1 reports "no limit" as a page-rounded i64::MAX.
    (limit < 1 << 62).then(|| limit.saturating_sub(read("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0)))
}

/// `Error::Config` unless `1 <= value <= max`, naming the field.
pub fn check_range(field: &str, value: usize, max: usize) -> Result<()> {
    ensure!((1..=max).contains(&value), Config, "{field} must be between 1 and {max}, got {value}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_overflow_sticks() {
        assert_eq!(Bytes::floats(&[2, 3]).get(), Some(24));
        assert_eq!(Bytes::of::<u8>(&[]).get(), Some(1));
        let huge = Bytes::floats(&[usize::MAX, 2]);
        assert_eq!(huge.get(), None);
        assert_eq!((huge + Bytes::new(1)).get(), None);
        assert_eq!((Bytes::new(u64::MAX) + Bytes::new(1)).get(), None);
        assert_eq!((Bytes::new(u64::MAX / 2 + 1) * 2).get(), None);
        assert_eq!([Bytes::new(1), Bytes::new(2)].into_iter().sum::<Bytes>().get(), Some(3));
        assert_eq!(huge.to_string(), "more than 2^64 bytes");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
        assert_eq!(human(300 << 30), "300 GiB");
    }

    #[test]
    fn parse_budgets() {
        assert_eq!(MemoryBudget::parse("available").unwrap(), MemoryBudget::Available);
        assert_eq!(MemoryBudget::parse("65536").unwrap(), MemoryBudget::Bytes(65536));
        assert_eq!(MemoryBudget::parse("512M").unwrap(), MemoryBudget::Bytes(512 << 20));
        assert_eq!(MemoryBudget::parse("1.5g").unwrap(), MemoryBudget::Bytes(3 << 29));
        for bad in ["", "G", "-1G", "0", "8X", "nanG", "1e30T"] {
            assert!(MemoryBudget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn needs_are_tested_against_the_scoped_budget() {
        let need = || Need::new("a test buffer", Bytes::new(2048));
        with_budget(MemoryBudget::Bytes(4096), || assert!(need().check().is_ok()));
        let err = with_budget(MemoryBudget::Bytes(1024), || need().hint("split it").check()).unwrap_err();
        let Error::InvalidArgument(m) = err else { panic!("{err:?}") };
        assert!(
            m.contains("a test buffer would need 2.0 KiB") && m.contains("1.0 KiB") && m.ends_with("split it"),
            "{m}"
        );
        let err = with_budget(MemoryBudget::Bytes(1024), || need().check_config()).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        // Overflowed sizes never fit, whatever the budget.
        let over =
            with_budget(MemoryBudget::Bytes(u64::MAX), || Need::new("x", Bytes::floats(&[usize::MAX, 8])).check());
        assert!(over.is_err());
        // The scope ends with the call.
        assert_eq!(current(), MemoryBudget::Available);
    }

    #[test]
    fn the_scope_is_restored_after_a_panic() {
        let r = std::panic::catch_unwind(|| with_budget(MemoryBudget::Bytes(1), || panic!("inside")));
        assert!(r.is_err());
        assert_eq!(current(), MemoryBudget::Available);
    }

    #[test]
    fn fallible_allocations() {
        let v: Vec<f32> = try_zeroed(1000, "test").unwrap();
        assert!(v.len() == 1000 && v.iter().all(|&x| x == 0.0));
        assert!(try_zeroed::<f32>(0, "test").unwrap().is_empty());
        assert_eq!(try_filled(3, 7u8, "test").unwrap(), vec![7, 7, 7]);
        // Far beyond any address space: an error, not an abort.
        assert!(try_zeroed::<f32>(usize::MAX / 8, "test").is_err());
        assert!(try_filled(usize::MAX / 8, 1.0f32, "test").is_err());
    }

    #[test]
    fn available_memory_is_positive_here() {
        let n = available_memory();
        assert!(n > 1 << 20, "{n}");
    }
}
