//! BEiT's per-step learning-rate schedule (unilm `cosine_scheduler`): linear warmup from 0 to
//! the base value over `warmup_steps` (numpy linspace, so the last warmup step reaches the base
//! value), then a half cosine from the base value down to `final_value`.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineSchedule {
    pub base_value: f64,
    pub final_value: f64,
    pub total_steps: usize,
    pub warmup_steps: usize,
}

impl CosineSchedule {
    pub fn value(&self, step: usize) -> f64 {
        let s = self.warmup_steps;
        if step < s {
            return if s == 1 { self.base_value } else { self.base_value * step as f64 / (s - 1) as f64 };
        }
        let cosine_steps = self.total_steps.saturating_sub(s).max(1);
        let i = (step - s).min(cosine_steps - 1) as f64;
        self.final_value
            + 0.5
                * (self.base_value - self.final_value)
                * (1.0 + (std::f64::consts::PI * i / cosine_steps as f64).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_derived_values() {
        let s = CosineSchedule { base_value: 1.0, final_value: 0.0, total_steps: 10, warmup_steps: 5 };
        // warmup: linspace(0, 1, 5)
        let warm: Vec<f64> = (0..5).map(|i| s.value(i)).collect();
        assert_eq!(warm, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        // cosine over 5 steps: 0.5·(1 + cos(π·i/5))
        assert!((s.value(5) - 1.0).abs() < 1e-12);
        assert!((s.value(7) - 0.5 * (1.0 + (0.4 * std::f64::consts::PI).cos())).abs() < 1e-12);
        assert!((s.value(9) - 0.5 * (1.0 + (0.8 * std::f64::consts::PI).cos())).abs() < 1e-12);
        let no_warm = CosineSchedule { base_value: 2.0, final_value: 1.0, total_steps: 4, warmup_steps: 0 };
        assert_eq!(no_warm.value(0), 2.0);
        assert!((no_warm.value(2) - 1.5).abs() < 1e-12);
    }
}
