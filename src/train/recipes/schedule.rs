//! Default schedule lengths.

/// Linear warmup steps of a run of `total_steps` when the caller gives none: a tenth of the
/// run, rounded down (so runs under 10 steps have none). This is libbeit's rule, not one of
/// BEiT's recipes, which give warmup in epochs or steps per setting (pretraining on 22k: 10k
/// steps; on 1k: 10 of 800 epochs; fine-tuning BEiT-B: 20 of 100 epochs).
pub fn default_warmup_steps(total_steps: u64) -> u64 {
    total_steps / 10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_a_tenth_rounded_down() {
        assert_eq!(default_warmup_steps(200), 20);
        assert_eq!(default_warmup_steps(1000), 100);
        assert_eq!(default_warmup_steps(15), 1);
        assert_eq!(default_warmup_steps(19), 1);
        assert_eq!(default_warmup_steps(9), 0);
        assert_eq!(default_warmup_steps(0), 0);
    }
}
