//! Subsets and unions of dataset files: the deterministic train/test split every command shares
//! (so pretraining can use exactly the images a fine-tune trains on, never its test images), and
//! a writer of chosen samples of one or more files into a new file (`beit dataset combine`).

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::dataset::{Dataset, DatasetHeader, DatasetSpec, DatasetWriter};
use crate::error::{Error, Result};

/// Deterministic train/test split of `0..n`: a seeded shuffle, the first `round(n·test_fraction)`
/// indices are the test set; both lists are returned sorted.
///
/// A fraction outside `[0, 1)` is refused (1 would leave nothing to train on).
pub fn split_indices(n: usize, test_fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    check_test_fraction(test_fraction)?;
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_test = ((n as f64) * test_fraction.clamp(0.0, 1.0)).round() as usize;
    let mut test = idx[..n_test].to_vec();
    let mut train = idx[n_test..].to_vec();
    test.sort_unstable();
    train.sort_unstable();
    Ok((train, test))
}

/// Refuses a test fraction outside `[0, 1)` (1 would leave nothing to train on), naming it.
pub fn check_test_fraction(test_fraction: f64) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&test_fraction),
        InvalidArgument,
        "--test-fraction {test_fraction} is not in [0, 1): it is the share of samples held out for evaluation"
    );
    Ok(())
}

/// What [`write_combined`] wrote: the new file's header and the optional sections it left out
/// because not every input had them (e.g. masks when one input has none).
#[derive(Debug, Clone)]
pub struct Combined {
    pub header: DatasetHeader,
    pub dropped_sections: Vec<&'static str>,
}

/// Writes the samples `indices` of each dataset in `parts`, in the order given, into a new
/// dataset file at `out` (atomically, as every [`DatasetWriter`]). The inputs must share one image
/// shape. An optional section (labels, masks, tokens) is kept when every input has it (tokens:
/// with the same grid) and dropped otherwise; the dropped ones are reported. Label values are
/// copied as they are: inputs whose label sets differ should not be mixed for classification.
pub fn write_combined(out: &Path, parts: &[(&Dataset, &[usize])]) -> Result<Combined> {
    let Some((first, _)) = parts.first() else {
        return Err(Error::InvalidArgument("no input datasets to combine".into()));
    };
    let h0 = first.header();
    let mut spec = DatasetSpec {
        height: h0.height,
        width: h0.width,
        channels: h0.channels,
        labels: true,
        masks: true,
        token_grid: h0.has_tokens().then_some((h0.token_grid_h, h0.token_grid_w)),
    };
    let mut total = 0usize;
    for (d, indices) in parts {
        let h = d.header();
        if (h.height, h.width, h.channels) != (h0.height, h0.width, h0.channels) {
            return Err(Error::InvalidArgument(format!(
                "{} has {}x{}x{} images but {} has {}x{}x{} (HxWxC): combined files need one shape",
                d.path().display(),
                h.height,
                h.width,
                h.channels,
                first.path().display(),
                h0.height,
                h0.width,
                h0.channels
            )));
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= d.len()) {
            return Err(Error::InvalidArgument(format!(
                "sample {bad} of {} does not exist ({} samples)",
                d.path().display(),
                d.len()
            )));
        }
        spec.labels &= h.has_labels();
        spec.masks &= h.has_masks();
        if !h.has_tokens() || spec.token_grid != Some((h.token_grid_h, h.token_grid_w)) {
            spec.token_grid = None;
        }
        total += indices.len();
    }
    if total == 0 {
        return Err(Error::InvalidArgument("the selection is empty: no sample to write".into()));
    }
    // Dropped: an optional section some input has that the output does not keep.
    let dropped_sections = [("labels", spec.labels), ("masks", spec.masks), ("tokens", spec.token_grid.is_some())]
        .into_iter()
        .filter(|&(name, kept)| !kept && parts.iter().any(|(d, _)| d.header().section_names().contains(&name)))
        .map(|(name, _)| name)
        .collect();
    let mut writer = DatasetWriter::create(out, spec)?;
    writer.reserve(total)?;
    for (d, indices) in parts {
        for &i in indices.iter() {
            let label = if spec.labels { d.label(i) } else { None };
            let mask = if spec.masks { d.mask(i) } else { None };
            // Through the little-endian bytes, so this also builds where `Dataset::tokens` does not.
            let tokens: Option<Vec<u16>> = spec
                .token_grid
                .and(d.tokens_le_bytes(i))
                .map(|b| b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect());
            writer.push(d.pixels(i), label, mask, tokens.as_deref())?;
        }
    }
    Ok(Combined { header: writer.finish()?, dropped_sections })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let (a, b) = split_indices(100, 0.2, 7).unwrap();
        assert_eq!((a.len(), b.len()), (80, 20));
        assert_eq!(split_indices(100, 0.2, 7).unwrap(), (a.clone(), b.clone()));
        assert!(split_indices(100, 1.0, 7).is_err() && split_indices(100, -0.1, 7).is_err());
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_ne!(split_indices(100, 0.2, 8).unwrap().1, b);
    }
}
