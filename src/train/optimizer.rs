//! Global-norm clipping and AdamW, traced into the step (SPEC.md
//! semantics: decoupled decay p -= lr * (adam_update + wd * p), on tensors
//! of rank >= 2 only; bias-corrected moments as PyTorch/optax).

use crate::graph::{Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The global L2 norm of all gradients (f32 scalar).
pub fn global_norm(grads: &[Tensor]) -> Result<Tensor> {
    let mut total = grads[0].square()?.sum_all()?;
    for g in &grads[1..] {
        total = total.add(&g.square()?.sum_all()?)?;
    }
    total.sqrt()
}

/// Scales gradients so their global norm is at most `max_norm`
/// (g * max_norm / max(norm, max_norm), as optax). `max_norm = 0` turns
/// clipping off (`train.grad_clip = 0`): the gradients come back as they
/// are. Returns the clipped gradients and the norm before clipping.
pub fn clip_by_global_norm(grads: &[Tensor], max_norm: f64) -> Result<(Vec<Tensor>, Tensor)> {
    let norm = global_norm(grads)?;
    if max_norm == 0.0 {
        return Ok((grads.to_vec(), norm));
    }
    let scale = norm
        .scalar_like(max_norm)?
        .div(&norm.maximum(&norm.scalar_like(max_norm)?)?)?;
    let clipped = grads
        .iter()
        .map(|g| g.mul(&scale))
        .collect::<Result<Vec<_>>>()?;
    Ok((clipped, norm))
}

/// One parameter's update.
pub struct Updated {
    pub param: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

impl AdamW {
    /// `count` is the 1-based update number (f32 scalar), `lr` an f32
    /// scalar; `decay` says whether this tensor is decayed. (The arguments
    /// are the optimizer's state for one tensor, spelled out as in the
    /// formula rather than bundled.)
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        p: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        lr: &Tensor,
        count: &Tensor,
        decay: bool,
    ) -> Result<Updated> {
        let m = m
            .mul_scalar(self.beta1)?
            .add(&g.mul_scalar(1.0 - self.beta1)?)?;
        let v = v
            .mul_scalar(self.beta2)?
            .add(&g.square()?.mul_scalar(1.0 - self.beta2)?)?;
        let bc1 = count
            .scalar_like(self.beta1)?
            .pow(count)?
            .neg()?
            .add_scalar(1.0)?;
        let bc2 = count
            .scalar_like(self.beta2)?
            .pow(count)?
            .neg()?
            .add_scalar(1.0)?;
        let m_hat = m.div(&bc1)?;
        let v_hat = v.div(&bc2)?;
        let mut step = m_hat.div(&v_hat.sqrt()?.add_scalar(self.eps)?)?;
        if decay && self.weight_decay != 0.0 {
            step = step.add(&p.mul_scalar(self.weight_decay)?)?;
        }
        Ok(Updated {
            param: p.sub(&step.mul(lr)?)?,
            m,
            v,
        })
    }
}
