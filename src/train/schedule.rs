//! The learning-rate schedule of SPEC.md: linear warmup to the peak, then
//! cosine decay to the final rate. The same formula runs on the host (for
//! tests and reporting) and inside the compiled step (from its step
//! counter).

use crate::graph::{DType, Result, Tensor};

/// Learning rate at 0-based step `t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub final_lr: f64,
    pub warmup: i64,
    pub total: i64,
}

impl Schedule {
    pub fn at(&self, t: i64) -> f64 {
        if t < self.warmup {
            return self.peak * (t + 1) as f64 / self.warmup as f64;
        }
        let progress = (t - self.warmup) as f64 / (self.total - self.warmup) as f64;
        self.final_lr
            + 0.5 * (self.peak - self.final_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// The same in the graph, from an i32 step counter, as an f32 scalar.
    pub fn traced(&self, step: &Tensor) -> Result<Tensor> {
        let t = step.convert(DType::F32)?;
        let warm = t
            .add_scalar(1.0)?
            .mul_scalar(self.peak / self.warmup.max(1) as f64)?;
        let progress = t
            .add_scalar(-(self.warmup as f64))?
            .mul_scalar(1.0 / (self.total - self.warmup) as f64)?;
        let cosine = progress
            .mul_scalar(std::f64::consts::PI)?
            .cos()?
            .add_scalar(1.0)?
            .mul_scalar(0.5 * (self.peak - self.final_lr))?
            .add_scalar(self.final_lr)?;
        let in_warmup = t.lt(&t.scalar_like(self.warmup as f64)?)?;
        in_warmup.select(&warm, &cosine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_values() {
        let s = Schedule {
            peak: 3e-4,
            final_lr: 3e-5,
            warmup: 1000,
            total: 12_000,
        };
        assert_eq!(s.at(0), 3e-7);
        assert!((s.at(999) - 3e-4).abs() < 1e-18);
        assert!((s.at(1000) - 3e-4).abs() < 1e-18);
        // Halfway through the cosine: the midpoint of peak and final.
        assert!((s.at(6500) - 1.65e-4).abs() < 1e-15);
        let end = 3e-5 + 0.5 * 2.7e-4 * (1.0 + (std::f64::consts::PI * 10_999.0 / 11_000.0).cos());
        assert!((s.at(11_999) - end).abs() < 1e-18 && (s.at(11_999) - 3e-5).abs() < 1e-11);
    }
}
