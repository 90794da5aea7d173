//! Experiment 2's router distillation (thesis 3.3, stage 1): the global
//! router G learns to imitate each layer's original router R_i on the
//! pool experts that came from layer i, on layer i's router input x_i of
//! the original model's forward:
//!
//!   L = sum_i mean_tokens sum_{e from layer i} KL(Bern(sigmoid(R_i x_i)_e)
//!                                                || Bern(sigmoid(G x_i)_e))
//!
//! "KL of the sigmoids" read as per-expert Bernoulli KL: each sigmoid is
//! the probability that the expert is wanted, independently of the
//! others (the sigmoid router's own reading, DeepSeek-V3).

use crate::graph::{Result, Tensor};

use super::layers::accumulation_dtype;

/// softplus(z) = log(1 + e^z), stably: max(z, 0) + log(1 + e^-|z|).
fn softplus(z: &Tensor) -> Result<Tensor> {
    let relu = z.maximum(&z.zeros_like()?)?;
    relu.add(&z.abs()?.neg()?.exp()?.add_scalar(1.0)?.log()?)
}

/// KL(Bern(sigmoid(t)) || Bern(sigmoid(s))) elementwise, from the logits
/// t (teacher) and s (student), without forming log(0):
/// p (log p - log q) + (1 - p)(log(1 - p) - log(1 - q)) with
/// log sigmoid(z) = -softplus(-z) and log(1 - sigmoid(z)) = -softplus(z).
pub fn bernoulli_kl_logits(t: &Tensor, s: &Tensor) -> Result<Tensor> {
    let p = t.logistic()?;
    let on = softplus(&s.neg()?)?.sub(&softplus(&t.neg()?)?)?;
    let off = softplus(s)?.sub(&softplus(t)?)?;
    p.mul(&on)?.add(&p.neg()?.add_scalar(1.0)?.mul(&off)?)
}

/// One layer's term on router inputs x [N, D]: the teacher's rows
/// `teacher` [P_i, D] and the student's `student` [P_i, D] for the same
/// P_i experts; the Bernoulli KL summed over them, averaged over the N
/// tokens (f32 or wider).
pub fn distill_term(x: &Tensor, teacher: &Tensor, student: &Tensor) -> Result<Tensor> {
    let acc = accumulation_dtype(x.dtype());
    let x = x.convert(acc)?;
    let t = x.linear(&teacher.convert(acc)?)?;
    let s = x.linear(&student.convert(acc)?)?;
    bernoulli_kl_logits(&t, &s)?.reduce_sum(&[1])?.mean_all()
}
