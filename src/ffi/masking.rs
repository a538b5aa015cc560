//! `beit_mask_generator`: BEiT's block-wise masking on its own ([`MaskingGenerator`], unilm's
//! `MaskingGenerator`), and the masking strategy enum the loader shares.

use std::mem::size_of;
use std::sync::Mutex;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::claim::{claim_state, HandleKind};
use super::model::check_slice;
use super::status::{beit_status, check_struct_size, guard, guard_infallible, non_null, non_null_mut};
use super::status::{FfiError, FfiResult};
use crate::data::masking::{MaskingGenerator, MaskingStrategy};
use crate::train::recipes::masking::default_masked_patches;

/// Which patches a mask covers (`beit_mask_generator_options.strategy`,
/// `beit_loader_options.masking`).
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum beit_masking_strategy {
    /// BEiT's block-wise masking: rectangles of random area and aspect ratio are added until
    /// the requested count is reached (it may fall slightly short, never over).
    BEIT_MASKING_BLOCKWISE = 0,
    /// Exactly the requested number of distinct patches, drawn uniformly (BEiT's ablation).
    BEIT_MASKING_RANDOM = 1,
}

/// A `beit_masking_strategy` as C passes it in: any 32-bit value, checked before use. The
/// header shows it as `beit_masking_strategy` (renamed in cbindgen.toml).
/// cbindgen:no-export
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawMaskingStrategy(pub u32);

impl RawMaskingStrategy {
    /// The strategy, or `BEIT_ERR_INVALID_ARGUMENT` naming `field`.
    pub(crate) fn to_strategy(self, field: &str) -> FfiResult<MaskingStrategy> {
        match self.0 {
            0 => Ok(MaskingStrategy::Blockwise),
            1 => Ok(MaskingStrategy::Random),
            other => Err(FfiError::invalid(format!(
                "{field} {other} is not a beit_masking_strategy (BEIT_MASKING_BLOCKWISE = 0, BEIT_MASKING_RANDOM = 1)"
            ))),
        }
    }

    pub(crate) fn of(strategy: MaskingStrategy) -> Self {
        RawMaskingStrategy(match strategy {
            MaskingStrategy::Blockwise => beit_masking_strategy::BEIT_MASKING_BLOCKWISE,
            MaskingStrategy::Random => beit_masking_strategy::BEIT_MASKING_RANDOM,
        } as u32)
    }
}

/// The smallest mask block BEiT's pretraining tries (unilm `--min_num_patches 16`); a smaller
/// masked count caps it.
pub(crate) const BEIT_MIN_MASK_BLOCK: usize = 16;

/// How a mask generator draws. Start from `beit_mask_generator_options_default()` (BEiT's
/// pretraining setting on whatever grid you give); 0 in a count field means its default.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct beit_mask_generator_options {
    /// `sizeof(beit_mask_generator_options)` as the caller compiled it.
    pub struct_size: usize,
    /// Patch grid rows (at least 1). Required.
    pub grid_height: usize,
    /// Patch grid columns (at least 1). Required.
    pub grid_width: usize,
    /// Patches to mask per mask, below `grid_height * grid_width`; 0: BEiT's ratio, 75 of 196
    /// patches, rounded.
    pub masked_patches: usize,
    /// Smallest block area tried, in 1..=masked_patches; 0: 16, or `masked_patches` if smaller
    /// (BEiT's pretraining). Block-wise only.
    pub min_block: usize,
    /// Largest block area, in min_block..=masked_patches; 0: `masked_patches`. Block-wise only.
    pub max_block: usize,
    /// A block's aspect ratio (height / width) is drawn log-uniformly from
    /// [min_aspect, 1 / min_aspect]; in (0, 1]; BEiT: 0.3 (the default). Block-wise only.
    pub min_aspect: f64,
    /// Block-wise (the default) or random.
    pub strategy: RawMaskingStrategy,
    /// Seeds the generator: the same options and seed give the same sequence of masks.
    pub seed: u64,
}

const MASK_OPTIONS_V1_SIZE: usize = size_of::<beit_mask_generator_options>();

/// BEiT's masking setting (block-wise, aspect 0.3, every count field 0 = its default) with
/// `struct_size` set; the grid is the caller's to fill in.
#[no_mangle]
pub extern "C" fn beit_mask_generator_options_default() -> beit_mask_generator_options {
    let beit = MaskingGenerator::beit(0, 0, 0);
    beit_mask_generator_options {
        struct_size: size_of::<beit_mask_generator_options>(),
        grid_height: 0,
        grid_width: 0,
        masked_patches: 0,
        min_block: 0,
        max_block: 0,
        min_aspect: beit.min_aspect,
        strategy: RawMaskingStrategy::of(MaskingStrategy::default()),
        seed: 0,
    }
}

/// A seeded mask generator. Its random state is a ChaCha8 generator seeded with
/// `rand_chacha::ChaCha8Rng::seed_from_u64(seed)`: the Rust `MaskingGenerator` driven by that
/// generator draws the same masks.
///
/// Thread safety: a generator takes one call at a time; a call made while another thread's
/// call holds it does nothing and returns `BEIT_ERR_BUSY`.
#[allow(non_camel_case_types)]
pub struct beit_mask_generator {
    generator: MaskingGenerator,
    strategy: MaskingStrategy,
    rng: Mutex<ChaCha8Rng>,
}

const _: () = super::status::assert_thread_safe::<beit_mask_generator>();

/// The generator the options describe, checked.
fn generator_of(o: &beit_mask_generator_options) -> FfiResult<(MaskingGenerator, MaskingStrategy)> {
    let strategy = o.strategy.to_strategy("opts->strategy")?;
    let (gh, gw) = (o.grid_height, o.grid_width);
    let n = gh.checked_mul(gw).ok_or_else(|| FfiError::invalid(format!("a {gh}x{gw} grid has too many patches")))?;
    if n < 2 {
        return Err(FfiError::invalid(format!(
            "opts->grid_height x opts->grid_width is {gh}x{gw}: a grid needs at least 2 patches (one masked, one not)"
        )));
    }
    let masked =
        if o.masked_patches == 0 { default_masked_patches((gh, gw)).clamp(1, n - 1) } else { o.masked_patches };
    if masked >= n {
        return Err(FfiError::invalid(format!(
            "opts->masked_patches is {masked}, but a {gh}x{gw} grid has {n} patches: mask fewer than all"
        )));
    }
    let min_block = if o.min_block == 0 { BEIT_MIN_MASK_BLOCK.min(masked) } else { o.min_block };
    if !(1..=masked).contains(&min_block) {
        return Err(FfiError::invalid(format!(
            "opts->min_block is {min_block}, but it must be in 1..={masked} (masked_patches)"
        )));
    }
    let max_block = if o.max_block == 0 { masked } else { o.max_block };
    if !(min_block..=masked).contains(&max_block) {
        return Err(FfiError::invalid(format!(
            "opts->max_block is {max_block}, but it must be in {min_block}..={masked} (min_block..=masked_patches)"
        )));
    }
    if !(o.min_aspect > 0.0 && o.min_aspect <= 1.0) {
        return Err(FfiError::invalid(format!("opts->min_aspect is {}, but it must be in (0, 1]", o.min_aspect)));
    }
    let generator = MaskingGenerator {
        height: gh,
        width: gw,
        num_masking_patches: masked,
        min_num_patches: min_block,
        max_num_patches: max_block,
        min_aspect: o.min_aspect,
    };
    Ok((generator, strategy))
}

/// Creates a mask generator. On success `*out` receives a generator to release with
/// `beit_mask_generator_free`.
///
/// Errors: `BEIT_ERR_NULL_POINTER` (opts, out), `BEIT_ERR_INVALID_ARGUMENT` (struct_size; a
/// grid of fewer than 2 patches or too many; masked_patches not below the grid's patches;
/// min_block, max_block or min_aspect out of range; an unknown strategy; the message names the
/// field).
///
/// # Safety
/// `opts` must be NULL or readable for its `struct_size`; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_mask_generator_create(
    opts: *const beit_mask_generator_options,
    out: *mut *mut beit_mask_generator,
) -> beit_status {
    guard(|| {
        let opts = non_null(opts, "opts")?;
        let out = non_null_mut(out, "out")?;
        // SAFETY: non-NULL; the caller promises struct_size readable bytes, and
        // check_struct_size makes sure they cover the first version read here.
        let o = unsafe {
            check_struct_size(opts, "opts", MASK_OPTIONS_V1_SIZE)?;
            opts.read_unaligned()
        };
        let (generator, strategy) = generator_of(&o)?;
        let rng = Mutex::new(ChaCha8Rng::seed_from_u64(o.seed));
        let handle = Box::into_raw(Box::new(beit_mask_generator { generator, strategy, rng }));
        // SAFETY: `out` is non-NULL and the caller promises it is writable.
        unsafe { out.write(handle) };
        Ok(())
    })
}

/// Draws the next mask into `mask`: `grid_height * grid_width` bytes, row-major, 1 for a
/// masked patch and 0 otherwise. When `masked_out` is not NULL it receives the number of
/// masked patches: exactly `masked_patches` for random masking; at most that for block-wise
/// masking, whose blocks may fall short (on average slightly; rarely, on a small grid, down
/// to 0).
///
/// Errors: `BEIT_ERR_NULL_POINTER` (generator, mask), `BEIT_ERR_BUFFER_SIZE` (`len` other than
/// the grid's patches, with both numbers), `BEIT_ERR_BUSY` (another thread's call holds the
/// generator; nothing was drawn). On an error nothing is written and no random state is used.
///
/// # Safety
/// `generator` must be NULL or a live generator; `mask` NULL or writable for `len` bytes;
/// `masked_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn beit_mask_generator_next(
    generator: *mut beit_mask_generator,
    mask: *mut u8,
    len: usize,
    masked_out: *mut usize,
) -> beit_status {
    guard(|| {
        let handle = non_null(generator, "generator")?;
        // SAFETY: non-NULL; the caller promises a live generator; the mutex guards its state.
        let handle = unsafe { &*handle };
        non_null(mask, "mask")?;
        let g = &handle.generator;
        let n = g.height * g.width;
        if len != n {
            return Err(FfiError::buffer_size(format!("len is {len}, but a {}x{} grid needs {n}", g.height, g.width)));
        }
        check_slice(mask, len, "mask")?;
        const KIND: HandleKind = HandleKind { name: "mask generator", recovery: "create a new one" };
        let mut rng = claim_state(&handle.rng, "beit_mask_generator_next", &KIND)?;
        // SAFETY: non-NULL, len bytes (checked against the grid), writable (the caller's
        // promise); u8 has no alignment requirement.
        let mask = unsafe { std::slice::from_raw_parts_mut(mask, len) };
        let masked = g.generate_with(handle.strategy, &mut *rng, mask);
        if !masked_out.is_null() {
            // SAFETY: non-NULL; the caller promises it is writable.
            unsafe { masked_out.write_unaligned(masked) };
        }
        Ok(())
    })
}

/// Frees a generator. NULL is a no-op.
///
/// # Safety
/// `generator` must be NULL or a generator not freed before, that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn beit_mask_generator_free(generator: *mut beit_mask_generator) {
    guard_infallible((), || {
        if !generator.is_null() {
            // SAFETY: the caller hands back a pointer from Box::into_raw, once.
            drop(unsafe { Box::from_raw(generator) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last_error() -> String {
        // SAFETY: never NULL, NUL-terminated.
        unsafe { CStr::from_ptr(super::super::status::beit_last_error_message()) }.to_str().unwrap().to_string()
    }

    fn create(o: &beit_mask_generator_options) -> Result<*mut beit_mask_generator, (beit_status, String)> {
        let mut g = std::ptr::null_mut();
        match unsafe { beit_mask_generator_create(o, &mut g) } {
            beit_status::BEIT_OK => Ok(g),
            status => {
                assert!(g.is_null());
                Err((status, last_error()))
            }
        }
    }

    fn next(g: *mut beit_mask_generator, len: usize) -> (Vec<u8>, usize) {
        let mut mask = vec![7u8; len];
        let mut masked = usize::MAX;
        assert_eq!(unsafe { beit_mask_generator_next(g, mask.as_mut_ptr(), len, &mut masked) }, beit_status::BEIT_OK);
        (mask, masked)
    }

    /// The C generator draws what the Rust `MaskingGenerator` draws from
    /// `ChaCha8Rng::seed_from_u64(seed)`, mask after mask, for both strategies and for BEiT's
    /// defaults and explicit parameters.
    #[test]
    fn masks_equal_the_rust_generator_bit_for_bit() {
        let mut o = beit_mask_generator_options_default();
        o.grid_height = 14;
        o.grid_width = 14;
        o.seed = 42;
        let beit = MaskingGenerator { min_num_patches: 16, ..MaskingGenerator::beit(14, 14, 75) };
        let custom = MaskingGenerator {
            height: 6,
            width: 9,
            num_masking_patches: 20,
            min_num_patches: 3,
            max_num_patches: 10,
            min_aspect: 0.5,
        };
        let mut o2 = o;
        (o2.grid_height, o2.grid_width, o2.masked_patches, o2.min_block, o2.max_block, o2.min_aspect, o2.seed) =
            (6, 9, 20, 3, 10, 0.5, 7);
        for (opts, reference) in [(o, beit.clone()), (o2, custom)] {
            for strategy in [MaskingStrategy::Blockwise, MaskingStrategy::Random] {
                let opts = beit_mask_generator_options { strategy: RawMaskingStrategy::of(strategy), ..opts };
                let g = create(&opts).unwrap();
                let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
                let n = reference.height * reference.width;
                for _ in 0..50 {
                    let mut want = vec![0u8; n];
                    let count = reference.generate_with(strategy, &mut rng, &mut want);
                    let (got, masked) = next(g, n);
                    assert_eq!((got, masked), (want, count));
                }
                unsafe { beit_mask_generator_free(g) };
            }
        }
    }

    /// Hand-checked properties: counts within bounds (exact for random masking), 0/1 values,
    /// the count equal to the ones in the mask, and every block-wise mask a union of blocks
    /// whose sides respect the aspect range.
    #[test]
    fn masks_respect_counts_and_are_made_of_blocks() {
        let mut o = beit_mask_generator_options_default();
        (o.grid_height, o.grid_width, o.seed) = (8, 8, 3);
        let g = create(&o).unwrap();
        // Default count on an 8x8 grid: 64 * 75/196 = 24.5 -> 24.
        let mut total = 0;
        for _ in 0..200 {
            let (mask, masked) = next(g, 64);
            assert!(mask.iter().all(|&v| v <= 1));
            assert_eq!(mask.iter().map(|&v| v as usize).sum::<usize>(), masked);
            assert!(masked <= 24, "{masked}");
            total += masked;
        }
        // Block-wise masking falls short only a little on average.
        assert!(total as f64 / 200.0 > 20.0, "mean {}", total as f64 / 200.0);
        unsafe { beit_mask_generator_free(g) };

        // One block of area exactly 4 (min = max = masked = 4) with aspect 1: always a 2x2 square.
        (o.masked_patches, o.min_block, o.max_block, o.min_aspect) = (4, 4, 4, 1.0);
        let g = create(&o).unwrap();
        for _ in 0..50 {
            let (mask, masked) = next(g, 64);
            assert_eq!(masked, 4);
            let cells: Vec<(usize, usize)> = (0..64).filter(|&i| mask[i] == 1).map(|i| (i / 8, i % 8)).collect();
            let (r0, c0) = cells[0];
            assert_eq!(cells, vec![(r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)]);
        }
        unsafe { beit_mask_generator_free(g) };

        o.strategy = RawMaskingStrategy(1);
        o.masked_patches = 30;
        (o.min_block, o.max_block) = (0, 0);
        let g = create(&o).unwrap();
        for _ in 0..20 {
            assert_eq!(next(g, 64).1, 30);
        }
        unsafe { beit_mask_generator_free(g) };
    }

    #[test]
    fn bad_options_and_buffers_are_refused() {
        let mut o = beit_mask_generator_options_default();
        (o.grid_height, o.grid_width) = (4, 4);
        let refused = |o: beit_mask_generator_options, words: &[&str]| {
            let (status, msg) = create(&o).unwrap_err();
            assert_eq!(status, beit_status::BEIT_ERR_INVALID_ARGUMENT, "{msg}");
            for w in words {
                assert!(msg.contains(w), "{msg} lacks {w}");
            }
        };
        refused(beit_mask_generator_options { grid_height: 1, grid_width: 1, ..o }, &["1x1", "2 patches"]);
        refused(beit_mask_generator_options { grid_height: usize::MAX, grid_width: 2, ..o }, &["too many"]);
        refused(beit_mask_generator_options { masked_patches: 16, ..o }, &["masked_patches is 16", "16 patches"]);
        refused(beit_mask_generator_options { masked_patches: 5, min_block: 6, ..o }, &["min_block is 6", "1..=5"]);
        refused(beit_mask_generator_options { masked_patches: 5, max_block: 6, ..o }, &["max_block is 6"]);
        refused(beit_mask_generator_options { min_aspect: 0.0, ..o }, &["min_aspect"]);
        refused(beit_mask_generator_options { min_aspect: f64::NAN, ..o }, &["min_aspect"]);
        refused(beit_mask_generator_options { strategy: RawMaskingStrategy(2), ..o }, &["strategy 2"]);
        refused(beit_mask_generator_options { struct_size: 8, ..o }, &["struct_size"]);
        let mut g = std::ptr::null_mut();
        assert_eq!(unsafe { beit_mask_generator_create(std::ptr::null(), &mut g) }, beit_status::BEIT_ERR_NULL_POINTER);
        assert_eq!(unsafe { beit_mask_generator_create(&o, std::ptr::null_mut()) }, beit_status::BEIT_ERR_NULL_POINTER);

        // A refused draw writes nothing and uses no randomness: the next good draw is the first.
        let g = create(&beit_mask_generator_options { seed: 9, ..o }).unwrap();
        let mut small = [9u8; 15];
        let status = unsafe { beit_mask_generator_next(g, small.as_mut_ptr(), 15, std::ptr::null_mut()) };
        assert_eq!(status, beit_status::BEIT_ERR_BUFFER_SIZE);
        assert!(last_error().contains("len is 15") && last_error().contains("needs 16"), "{}", last_error());
        assert_eq!(small, [9u8; 15]);
        let status = unsafe { beit_mask_generator_next(g, std::ptr::null_mut(), 16, std::ptr::null_mut()) };
        assert_eq!(status, beit_status::BEIT_ERR_NULL_POINTER);
        let status =
            unsafe { beit_mask_generator_next(std::ptr::null_mut(), small.as_mut_ptr(), 16, std::ptr::null_mut()) };
        assert_eq!(status, beit_status::BEIT_ERR_NULL_POINTER);
        let fresh = create(&beit_mask_generator_options { seed: 9, ..o }).unwrap();
        assert_eq!(next(g, 16), next(fresh, 16));
        unsafe { beit_mask_generator_free(g) };
        unsafe { beit_mask_generator_free(fresh) };
        unsafe { beit_mask_generator_free(std::ptr::null_mut()) };
    }
}
