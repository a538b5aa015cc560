//! How many patches pretraining masks by default.

/// BEiT masks 75 of the 196 patches of a 224x224 image in 16x16 patches (`--num_mask_patches
/// 75`, about 40%).
pub const BEIT_MASKED_PATCHES: usize = 75;
/// The patches of BEiT's 14x14 pretraining grid.
pub const BEIT_GRID_PATCHES: usize = 196;

/// Patches masked per image on a `grid` (rows, cols) when the caller gives no count: BEiT's
/// ratio, 75/196 of the grid, rounded to the nearest count (halves up).
pub fn default_masked_patches(grid: (usize, usize)) -> usize {
    let (rows, cols) = grid;
    ((rows * cols) as f64 * BEIT_MASKED_PATCHES as f64 / BEIT_GRID_PATCHES as f64).round() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beit_masks_75_of_196_and_other_grids_keep_the_ratio() {
        // 224/16: BEiT's own setting.
        assert_eq!(default_masked_patches((14, 14)), 75);
        // tiny32 (32/4, 8x8): 64 * 75/196 = 24.49 -> 24.
        assert_eq!(default_masked_patches((8, 8)), 24);
        // 384/16 (24x24): 576 * 75/196 = 220.41 -> 220.
        assert_eq!(default_masked_patches((24, 24)), 220);
        // 640/16 (40x40): 1600 * 75/196 = 612.24 -> 612.
        assert_eq!(default_masked_patches((40, 40)), 612);
        // 7x14 = 98 patches: exactly half of 196, 37.5 -> 38 (halves round up).
        assert_eq!(default_masked_patches((7, 14)), 38);
        // A non-square grid counts rows times columns: 14x28 = 392 -> 150.
        assert_eq!(default_masked_patches((14, 28)), 150);
        // 2x2 = 4 patches: 1.53 -> 2.
        assert_eq!(default_masked_patches((2, 2)), 2);
    }
}
