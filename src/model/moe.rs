//! The shared mixture-of-experts block: one router and E SwiGLU experts
//! used by every layer. Per token: p = softmax(W_r x), the top-k experts,
//! weights = their probabilities renormalised, output = weighted sum of the
//! chosen experts. Dropless, with the Switch-style balance loss.
//!
//! Routed computation (the default) runs each expert only on its tokens:
//! the N*k (token, expert) assignments are sorted by expert, each expert's
//! group is padded to a multiple of `moe_block_size`, and
//! [`Tensor::grouped_matmul`] runs the blocks in an XLA loop that reads
//! each block's expert weights in place. Padding costs at most
//! E * (block - 1) extra rows, and blocks past the last expert's rows are
//! skipped; no token is dropped. The dense variant computes all E experts
//! on every token (for checking and for benchmarks).
//!
//! Why a loop over blocks (issue 14, measured on the 2-core CPU machine):
//! - Gathering every block's weights for one batched matmul copied
//!   [blocks, F, D] per projection (about 0.5 GB per layer at 4 x 1024
//!   tokens), kept the copies for the backward pass and scatter-added
//!   gradients of the same size: the 50M model at 4 x 1024 was killed at
//!   24 GB. The loop needs 13 GB there and is as fast (27 s per step);
//!   at the mid-size shape it is within noise of the gather (1.08 s vs
//!   0.99 s per step).
//! - A static per-expert capacity layout [E, C, D] is dropless only with
//!   C = N * k, E times the rows.
//! - `ragged_dot` lowers to a slow loop on XLA:CPU (JAX's ragged variant
//!   is slower than masked-dense and runs out of memory at 4 x 1024).

use crate::graph::{DType, DotDims, Result, Tensor, TensorType, WeightLayout::OutIn};

use super::config::RouterScore;
use super::layers::{accumulation_dtype, silu};
use super::params::Moe;

/// How the experts are evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertCompute {
    /// Each expert only on the tokens routed to it, in blocks of `block`
    /// rows (0 = automatic, see [`auto_block`]).
    Routed { block: i64 },
    /// Every expert on every token, masked by the routing weights.
    Dense,
}

/// Routing decisions for N tokens.
pub struct Routing {
    /// Router probabilities [N, E] (accumulation dtype).
    pub probs: Tensor,
    /// Chosen experts [N, k] (i32) and their renormalised weights [N, k].
    pub experts: Tensor,
    pub weights: Tensor,
}

/// The router on x [N, D] with weights [E, D]: p = softmax(W_r x) in the
/// accumulation dtype, the top-k experts and their renormalised weights.
pub fn route(x: &Tensor, router: &Tensor, k: i64) -> Result<Routing> {
    route_as(x, router, k, true)
}

/// [`route`], with the chosen experts' probabilities divided by their sum
/// only when `normalize` (Qwen3-MoE's `norm_topk_prob`); otherwise they
/// are the plain softmax probabilities.
pub fn route_as(x: &Tensor, router: &Tensor, k: i64, normalize: bool) -> Result<Routing> {
    let rule = RouterRule {
        score: RouterScore::Softmax,
        normalize,
    };
    route_with(x, router, k, rule, None)
}

/// How a router turns its logits into the chosen experts' weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterRule {
    pub score: RouterScore,
    /// Divide the chosen experts' scores by their sum.
    pub normalize: bool,
}

/// Added to the logits of experts a layer may not choose (a pooled MoE
/// restricted to a layer's own experts): far below any real logit, finite
/// so that no inf - inf appears.
pub const EXCLUDED_LOGIT: f64 = -1e30;

/// The router on x [N, D] with weights [E, D] under `rule`, the logits
/// plus `mask` [E] (0 or [`EXCLUDED_LOGIT`]) where given: scores are
/// softmax(logits) or sigmoid(logits) in the accumulation dtype, the top-k
/// of them are chosen, and their weights are the scores, renormalised if
/// `rule.normalize`. `probs` is softmax(logits) for softmax scoring and
/// the sigmoid scores over their sum for sigmoid scoring (a distribution
/// over the experts either way, for the balance loss).
pub fn route_with(
    x: &Tensor,
    router: &Tensor,
    k: i64,
    rule: RouterRule,
    mask: Option<&Tensor>,
) -> Result<Routing> {
    let n = x.dim(0)?;
    let acc = accumulation_dtype(x.dtype());
    let mut logits = x.convert(acc)?.linear(&router.convert(acc)?)?;
    if let Some(m) = mask {
        let e = m.dim(0)?;
        logits = logits.add(&m.convert(acc)?.reshape(&[1, e])?)?;
    }
    let sum_rows = |t: &Tensor| -> Result<Tensor> { t.reduce_sum(&[1])?.reshape(&[n, 1]) };
    let (probs, scores) = match rule.score {
        RouterScore::Softmax => {
            let p = logits.softmax(-1)?;
            (p.clone(), p)
        }
        RouterScore::Sigmoid => {
            let a = logits.logistic()?;
            (a.div(&sum_rows(&a)?)?, a)
        }
    };
    let (top, experts) = scores.top_k(k)?;
    let weights = if rule.normalize {
        top.div(&sum_rows(&top)?)?
    } else {
        top
    };
    Ok(Routing {
        probs,
        experts,
        weights,
    })
}

/// Switch balance loss for one application: E * sum_e f_e * P_e, with f_e
/// the share of the N*k assignments that went to e and P_e the mean router
/// probability of e. Equals 1 for uniform routing.
fn balance_loss(r: &Routing, num_experts: i64) -> Result<Tensor> {
    let (n, k) = (r.experts.dim(0)?, r.experts.dim(1)?);
    let acc = r.probs.dtype();
    let g = r.probs.graph();
    let ids = g.iota(TensorType::new(DType::I32, &[n, k, num_experts]), 2)?;
    let chosen = ids.eq(&r.experts.reshape(&[n, k, 1])?)?.convert(acc)?;
    let f = chosen
        .reduce_sum(&[0, 1])?
        .mul_scalar(1.0 / (n * k) as f64)?;
    let p = r.probs.mean(&[0])?;
    f.mul(&p)?.sum_all()?.mul_scalar(num_experts as f64)
}

/// Per-expert routing totals of one MoE application over N tokens, what
/// Qwen3-MoE's balance loss pools over every layer: the assignments
/// [E] (over the N*k choices) and the router probabilities summed over
/// the tokens [E], in the accumulation dtype.
pub struct RouterTotals {
    pub assignments: Tensor,
    pub probs: Tensor,
}

impl RouterTotals {
    fn of(r: &Routing, num_experts: i64) -> Result<RouterTotals> {
        let (n, k) = (r.experts.dim(0)?, r.experts.dim(1)?);
        let g = r.probs.graph();
        let ids = g.iota(TensorType::new(DType::I32, &[n, k, num_experts]), 2)?;
        let chosen = ids.eq(&r.experts.reshape(&[n, k, 1])?)?;
        Ok(RouterTotals {
            assignments: chosen.convert(r.probs.dtype())?.reduce_sum(&[0, 1])?,
            probs: r.probs.reduce_sum(&[0])?,
        })
    }
}

/// transformers' `load_balancing_loss_func` (no attention mask) from the
/// totals of every MoE layer stacked along a leading axis [.., E], over
/// `tokens` = layers x tokens per layer: with f_e = assignments_e /
/// tokens and P_e = probs_e / tokens, E * sum_e f_e P_e. Equals k for
/// uniform routing.
pub fn pooled_balance_loss(totals: &RouterTotals, tokens: i64) -> Result<Tensor> {
    let e = totals.probs.dim(-1)?;
    let scale = 1.0 / tokens as f64;
    let f = totals.assignments.mul_scalar(scale)?;
    let p = totals.probs.mul_scalar(scale)?;
    f.mul(&p)?.reduce_sum(&[-1])?.mul_scalar(e as f64)
}

/// One layer's MoE block of a per-layer MoE on x [N, D]: the output
/// [N, D] and its routing totals.
pub fn layer_moe(
    x: &Tensor,
    w: &Moe<Tensor>,
    k: i64,
    norm_topk_prob: bool,
    compute: ExpertCompute,
) -> Result<(Tensor, RouterTotals)> {
    let e = w.router.dim(0)?;
    let r = route_as(x, &w.router, k, norm_topk_prob)?;
    let totals = RouterTotals::of(&r, e)?;
    Ok((expert_outputs(x, w, &r, e, compute)?, totals))
}

/// The chosen experts' outputs on x [N, D], weighted as routed.
fn expert_outputs(
    x: &Tensor,
    w: &Moe<Tensor>,
    r: &Routing,
    e: i64,
    compute: ExpertCompute,
) -> Result<Tensor> {
    let weights = r.weights.convert(x.dtype())?;
    match compute {
        ExpertCompute::Dense => dense_experts(x, w, &r.experts, &weights, e),
        ExpertCompute::Routed { block } => routed_experts(x, w, &r.experts, &weights, e, block),
    }
}

/// The shared MoE on x [N, D] (softmax, renormalised top-k): returns
/// (output [N, D], balance loss).
pub fn shared_moe(
    x: &Tensor,
    w: &Moe<Tensor>,
    k: i64,
    compute: ExpertCompute,
) -> Result<(Tensor, Tensor)> {
    let rule = RouterRule {
        score: RouterScore::Softmax,
        normalize: true,
    };
    pool_moe(x, w, k, rule, None, compute)
}

/// A block of experts used by several layers (the shared MoE, or a
/// pooled MoE's pool) on x [N, D], routed by `rule` over the experts
/// `mask` leaves (all when None): returns (output [N, D], balance loss).
pub fn pool_moe(
    x: &Tensor,
    w: &Moe<Tensor>,
    k: i64,
    rule: RouterRule,
    mask: Option<&Tensor>,
    compute: ExpertCompute,
) -> Result<(Tensor, Tensor)> {
    let e = w.router.dim(0)?;
    let r = route_with(x, &w.router, k, rule, mask)?;
    let aux = balance_loss(&r, e)?;
    Ok((expert_outputs(x, w, &r, e, compute)?, aux))
}

/// Every expert on every token; non-chosen experts get weight 0.
fn dense_experts(
    x: &Tensor,
    w: &Moe<Tensor>,
    experts: &Tensor,
    weights: &Tensor,
    e: i64,
) -> Result<Tensor> {
    let (n, k) = (experts.dim(0)?, experts.dim(1)?);
    let g = x.graph();
    let ids = g.iota(TensorType::new(DType::I32, &[n, k, e]), 2)?;
    let onehot = ids.eq(&experts.reshape(&[n, k, 1])?)?.convert(x.dtype())?;
    let combine = onehot
        .mul(&weights.reshape(&[n, k, 1])?)?
        .reduce_sum(&[1])?; // [N, E]
    let in_proj = DotDims {
        lhs_contract: vec![1],
        rhs_contract: vec![2],
        ..Default::default()
    };
    let gate = x.dot_general(&w.experts.gate, &in_proj)?; // [N, E, F]
    let up = x.dot_general(&w.experts.up, &in_proj)?;
    let h = silu(&gate)?.mul(&up)?;
    let out_proj = DotDims {
        lhs_contract: vec![2],
        rhs_contract: vec![2],
        lhs_batch: vec![1],
        rhs_batch: vec![0],
    };
    let y = h.dot_general(&w.experts.down, &out_proj)?; // [E, N, D]
    let combine_t = combine.transpose(&[1, 0])?.reshape(&[e, n, 1])?;
    y.mul(&combine_t)?.reduce_sum(&[0])
}

/// Exclusive prefix sum of a short integer vector [E] (via a triangular
/// matmul; E is small).
fn exclusive_cumsum(v: &Tensor) -> Result<Tensor> {
    let e = v.dim(0)?;
    let g = v.graph();
    let i = g.iota(TensorType::new(DType::I32, &[e, e]), 0)?;
    let j = g.iota(TensorType::new(DType::I32, &[e, e]), 1)?;
    let before = i.lt(&j)?.convert(v.dtype())?;
    v.dot_general(
        &before,
        &DotDims {
            lhs_contract: vec![0],
            rhs_contract: vec![0],
            ..Default::default()
        },
    )
}

/// The mean group size rounded up to a power of two, in 8..=128. Larger
/// blocks pad more rows (at most E * (block - 1)); smaller ones run more,
/// smaller matmuls and re-read an expert's weights once per block, which
/// costs more on CPU (measured with per-block weight gathers: blocks of 16
/// were 30% slower than 64-128 at the 50M shape).
pub fn auto_block(assignments: i64, experts: i64) -> i64 {
    let mean_group = (assignments / experts).max(1) as u64;
    (mean_group.next_power_of_two() as i64).clamp(8, 128)
}

/// Each expert on its own tokens, in padded blocks (see module docs).
fn routed_experts(
    x: &Tensor,
    w: &Moe<Tensor>,
    experts: &Tensor,
    weights: &Tensor,
    e: i64,
    block: i64,
) -> Result<Tensor> {
    let (n, k, d) = (experts.dim(0)?, experts.dim(1)?, x.dim(1)?);
    let a = n * k; // assignments, token-major: assignment i is token i / k
    let block = if block > 0 { block } else { auto_block(a, e) };
    let g = x.graph();
    let int = |dims: &[i64]| TensorType::new(DType::I32, dims);
    let iota_a = g.iota(int(&[a]), 0)?;
    let (sorted_expert, perm) = {
        let (keys, mut vals) = experts.reshape(&[a])?.sort_by_key(&[&iota_a])?;
        (keys, vals.remove(0))
    };
    // Group sizes, their starts, and starts after padding to `block`.
    let counts = g
        .iota(int(&[a, e]), 1)?
        .eq(&experts.reshape(&[a, 1])?)?
        .convert(DType::I32)?
        .reduce_sum(&[0])?; // [E]
    let starts = exclusive_cumsum(&counts)?;
    let padded = counts
        .add_scalar((block - 1) as f64)?
        .div(&counts.scalar_like(block as f64)?)?
        .mul_scalar(block as f64)?;
    let padded_starts = exclusive_cumsum(&padded)?;
    // Sorted assignment i lands in row padded_start[e] + (i - start[e]).
    let rank = iota_a.sub(&starts.take(&sorted_expert)?)?;
    let slot = padded_starts.take(&sorted_expert)?.add(&rank)?;
    let rows = (a + e * (block - 1) + block - 1) / block * block;
    let blocks = rows / block;
    // The maps between assignments (token-major: a = token * k + j) and
    // rows, both ways, so that moving rows forward and back are gathers.
    let (_, mut inv) = perm.sort_by_key(&[&iota_a])?;
    let row_of_assignment = slot.take(&inv.remove(0))?; // [A]
    let assignment_of_row = g
        .zeros(int(&[rows]))?
        .scatter_add(&slot, &perm.add_scalar(1.0)?)?
        .add_scalar(-1.0)?; // -1 on padding rows
    let padding = assignment_of_row.lt(&assignment_of_row.scalar_like(0.0)?)?;
    let assignment_of_row =
        padding.select(&assignment_of_row.full_like(a as f64)?, &assignment_of_row)?;
    let token_of_row = padding.select(
        &assignment_of_row.full_like(n as f64)?,
        &assignment_of_row.div(&assignment_of_row.scalar_like(k as f64)?)?,
    )?;
    let xs = x.permute_rows(&token_of_row, &row_of_assignment.reshape(&[n, k])?)?; // [rows, D]

    // Block b belongs to the expert whose padded range contains its start.
    let block_start = g.iota(int(&[blocks, 1]), 0)?.mul_scalar(block as f64)?;
    let padded_end = padded_starts.add(&padded)?.reshape(&[1, e])?;
    let block_expert = padded_end
        .le(&block_start)?
        .convert(DType::I32)?
        .reduce_sum(&[1])?
        .minimum(&g.full((e - 1) as f64, int(&[blocks]))?)?;
    // Blocks past the last expert's padded range hold only padding.
    let used = padded
        .reduce_sum(&[0])?
        .div(&g.full(block as f64, int(&[]))?)?;
    let grouped = |x: &Tensor, w: &Tensor| x.grouped_matmul(w, &block_expert, &used, OutIn);
    let gate = grouped(&xs, &w.experts.gate)?; // [rows, F]
    let up = grouped(&xs, &w.experts.up)?;
    let h = silu(&gate)?.mul(&up)?;
    let ys = grouped(&h, &w.experts.down)?; // [rows, D]
    let y = ys.permute_rows(&row_of_assignment, &assignment_of_row.reshape(&[rows, 1])?)?; // [A, D]
    y.reshape(&[n, k, d])?
        .mul(&weights.reshape(&[n, k, 1])?)?
        .reduce_sum(&[1])
}
