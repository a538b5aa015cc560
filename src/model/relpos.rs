//! Relative position bias: the index that maps token pairs to table rows, the run-time resize of
//! a table to another patch grid (Hugging Face's rule, see BEIT_SPEC §3.6), and the gather into a
//! `[heads, tokens, tokens]` bias.

use super::resample;

use super::params::rel_pos_table_rows;

/// Table row for every (query, key) token pair of a `grid`, `[T, T]` with T = h·w + 1.
/// Row 0 (CLS as query) uses M−3, column 0 (CLS as key) M−2, the corner M−1.
pub fn relative_position_index(grid: (usize, usize)) -> Vec<usize> {
    let (gh, gw) = grid;
    let n = gh * gw;
    let t = n + 1;
    let m = rel_pos_table_rows(grid);
    let mut idx = vec![0usize; t * t];
    for i in 0..n {
        let (hi, wi) = (i / gw, i % gw);
        for j in 0..n {
            let (hj, wj) = (j / gw, j % gw);
            idx[(i + 1) * t + j + 1] = (hi + gh - 1 - hj) * (2 * gw - 1) + (wi + gw - 1 - wj);
        }
    }
    for j in 0..t {
        idx[j] = m - 3;
        idx[j * t] = m - 2;
    }
    idx[0] = m - 1;
    idx
}

/// Whether [`resize_table`] changes a table made for `native` when used at `grid`. Not the same
/// as `native != grid`: HF reads the table's image width-first, so a non-square native grid is
/// resized (transposed) even at its own size.
pub fn table_is_resized(native: (usize, usize), grid: (usize, usize)) -> bool {
    (2 * native.1 - 1, 2 * native.0 - 1) != (2 * grid.0 - 1, 2 * grid.1 - 1)
}

/// The table for `grid`, from a table made for `native` (`[M, heads]`, row-major).
///
/// HF reshapes the first M−3 rows as a `(2·native_w−1) x (2·native_h−1)` image per head (note the
/// width-first order) and resizes it bilinearly to `(2·h−1) x (2·w−1)`; the three CLS rows are
/// kept. Returns `None` when that resize is the identity, so callers use the table as is.
pub fn resize_table(table: &[f32], heads: usize, native: (usize, usize), grid: (usize, usize)) -> Option<Vec<f32>> {
    if !table_is_resized(native, grid) {
        return None;
    }
    let (old_h, old_w) = (2 * native.0 - 1, 2 * native.1 - 1);
    let (new_h, new_w) = (2 * grid.0 - 1, 2 * grid.1 - 1);
    // Source image is (rows = old_w, cols = old_h) in HF's reshape.
    let (src_rows, src_cols) = (old_w, old_h);
    let old_rows = old_h * old_w;
    // [rows·cols, heads] → [heads, rows, cols]
    let mut planes = vec![0.0f32; heads * old_rows];
    for r in 0..old_rows {
        for h in 0..heads {
            planes[h * old_rows + r] = table[r * heads + h];
        }
    }
    let resized = resample::bilinear(&planes, heads, src_rows, src_cols, new_h, new_w);
    let new_rows = new_h * new_w;
    let mut out = vec![0.0f32; (new_rows + 3) * heads];
    for r in 0..new_rows {
        for h in 0..heads {
            out[r * heads + h] = resized[h * new_rows + r];
        }
    }
    out[new_rows * heads..].copy_from_slice(&table[old_rows * heads..(old_rows + 3) * heads]);
    debug_assert_eq!(out.len(), rel_pos_table_rows(grid) * heads);
    Some(out)
}

/// Adds the bias of `table` (for `grid`, `[M, heads]`) to `bias` (`[heads, T, T]`).
pub fn add_bias(bias: &mut [f32], table: &[f32], heads: usize, index: &[usize]) {
    let tt = index.len();
    assert_eq!(bias.len(), heads * tt);
    for h in 0..heads {
        let plane = &mut bias[h * tt..(h + 1) * tt];
        for (b, &i) in plane.iter_mut().zip(index) {
            *b += table[i * heads + h];
        }
    }
}

/// Backward of [`add_bias`]: scatter-adds `dbias` (`[heads, T, T]`) into `dtable`
/// (`[M, heads]`, accumulated). Each head runs in order over its pairs, so the result does not
/// depend on the thread count.
pub fn add_bias_backward(dtable: &mut [f32], dbias: &[f32], heads: usize, index: &[usize]) {
    let tt = index.len();
    assert_eq!(dbias.len(), heads * tt);
    for h in 0..heads {
        for (&g, &i) in dbias[h * tt..(h + 1) * tt].iter().zip(index) {
            dtable[i * heads + h] += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_spec_for_2x2() {
        // grid 2x2: M = 3·3 + 3 = 12; patch pairs use (dh + 1)·3 + (dw + 1).
        let idx = relative_position_index((2, 2));
        assert_eq!(idx.len(), 25);
        assert_eq!(idx[0], 11);
        assert_eq!(&idx[1..5], &[9, 9, 9, 9]);
        assert_eq!(idx[5], 10);
        // token 1 = patch (0,0) attending patch (1,1) (token 4): dh = -1, dw = -1 → 0.
        assert_eq!(idx[5 + 4], 0);
        // patch (1,1) attending patch (0,0): dh = 1, dw = 1 → 2·3 + 2 = 8.
        assert_eq!(idx[4 * 5 + 1], 8);
        // self: (0 + 1)·3 + 1 = 4.
        assert_eq!(idx[2 * 5 + 2], 4);
    }

    #[test]
    fn bias_backward_is_the_adjoint_of_the_gather() {
        // <add_bias(table), r> = <table, add_bias_backward(r)> for any table and r.
        let grid = (2, 3);
        let index = relative_position_index(grid);
        let heads = 2;
        let m = rel_pos_table_rows(grid);
        let table: Vec<f32> = (0..m * heads).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let r: Vec<f32> = (0..heads * index.len()).map(|i| ((i * 5) % 13) as f32 * 0.1).collect();
        let mut bias = vec![0.0f32; heads * index.len()];
        add_bias(&mut bias, &table, heads, &index);
        let mut dtable = vec![0.0f32; m * heads];
        add_bias_backward(&mut dtable, &r, heads, &index);
        let lhs: f64 = bias.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum();
        let rhs: f64 = table.iter().zip(&dtable).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert!((lhs - rhs).abs() < 1e-6 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }

    #[test]
    fn same_grid_needs_no_resize() {
        let table = vec![0.5f32; 12 * 2];
        assert!(resize_table(&table, 2, (2, 2), (2, 2)).is_none());
        let bigger = resize_table(&table, 2, (2, 2), (3, 3)).unwrap();
        assert_eq!(bigger.len(), rel_pos_table_rows((3, 3)) * 2);
        assert!(bigger.iter().all(|&v| (v - 0.5).abs() < 1e-7));
    }
}
