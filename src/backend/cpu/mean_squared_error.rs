//! Mean squared error fused with its gradient, for the pixel-regression MIM loss (the sibling of
//! `cross_entropy`): rows are the masked patches' predictions (the caller gathers them), each
//! row's loss is the mean of its squared errors (so the scale does not depend on the row
//! length), and the loss is the mean of the row losses over the whole batch.

use rayon::prelude::*;

/// For a block of rows of a larger batch of `total_rows` rows: `pred` and `target` are
/// `[rows, cols]`; on return `pred` holds the gradient of the batch loss
/// `(1/total_rows) Σ_rows (1/cols) Σ_cols (pred − target)²`, that is
/// `2·(pred − target)/(cols · total_rows)`, and the return value is the SUM of this block's row
/// losses (the caller adds the blocks and divides by `total_rows`).
pub fn mse_fused_part(pred: &mut [f32], target: &[f32], cols: usize, total_rows: usize) -> f64 {
    assert_eq!(pred.len(), target.len(), "mse: prediction and target lengths");
    assert!(cols > 0 && pred.len().is_multiple_of(cols), "mse: rows of {cols} columns");
    let rows = pred.len() / cols;
    assert!(total_rows >= rows, "mse: total_rows smaller than the block");
    if rows == 0 {
        return 0.0;
    }
    let grad_scale = 2.0 / (cols as f64 * total_rows as f64);
    // Per-row losses are summed in row order afterwards, so the result does not depend on
    // how rayon schedules the rows.
    let losses: Vec<f64> = pred
        .par_chunks_mut(cols)
        .zip(target.par_chunks(cols))
        .map(|(row, want)| {
            let mut sum = 0.0f64;
            for (p, &t) in row.iter_mut().zip(want) {
                let err = *p as f64 - t as f64;
                sum += err * err;
                *p = (grad_scale * err) as f32;
            }
            sum / cols as f64
        })
        .collect();
    losses.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_loss(pred: &[f64], target: &[f32], cols: usize) -> f64 {
        let rows = pred.len() / cols;
        let sq: f64 = pred.iter().zip(target).map(|(&p, &t)| (p - t as f64).powi(2)).sum();
        sq / (cols * rows) as f64
    }

    #[test]
    fn hand_value() {
        // Row 0 errors (1, −1, 2, 0): mean 6/4; row 1 errors (0, 0, 0, 3): mean 9/4.
        let mut pred = vec![1.0f32, 0.0, 2.0, 5.0, 1.0, 1.0, 1.0, 4.0];
        let target = [0.0f32, 1.0, 0.0, 5.0, 1.0, 1.0, 1.0, 1.0];
        let sum = mse_fused_part(&mut pred, &target, 4, 2);
        assert!((sum - (1.5 + 2.25)).abs() < 1e-12);
        // Gradient 2·err/(4·2).
        assert_eq!(pred, vec![0.25, -0.25, 0.5, 0.0, 0.0, 0.0, 0.0, 0.75]);
    }

    #[test]
    fn gradient_matches_finite_differences_of_the_batch_mean() {
        let (rows, cols) = (3, 5);
        let x: Vec<f64> = (0..rows * cols).map(|i| ((i * 37 % 23) as f64 / 7.0) - 1.5).collect();
        let target: Vec<f32> = (0..rows * cols).map(|i| ((i * 13 % 11) as f32 / 5.0) - 1.0).collect();
        // Two blocks (rows 0..2 and 2..3) of one batch of 3 rows.
        let mut g: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let (a, b) = g.split_at_mut(2 * cols);
        let sum =
            mse_fused_part(a, &target[..2 * cols], cols, rows) + mse_fused_part(b, &target[2 * cols..], cols, rows);
        assert!((sum / rows as f64 - reference_loss(&x, &target, cols)).abs() < 1e-6);
        for i in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += 1e-5;
            down[i] -= 1e-5;
            let fd = (reference_loss(&up, &target, cols) - reference_loss(&down, &target, cols)) / 2e-5;
            assert!((g[i] as f64 - fd).abs() < 1e-6, "{i}: {} vs {fd}", g[i]);
        }
    }
}
