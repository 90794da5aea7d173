//! The transformer's building blocks, traced with `graph`: RMSNorm, RoPE
//! (rotate-half), causal grouped-query attention and the SwiGLU MLP.
//!
//! Shapes are spelled out at the top of each function: B batch, S sequence,
//! D hidden, H query heads, K key/value heads, G = H/K, Hd head dim, F
//! intermediate.

use crate::graph::{concatenate, DType, DotDims, Result, Tensor, TensorType};

use super::params::Attention;

/// The dtype norms, softmax and losses are computed in: f32, or f64 when
/// the model itself runs in f64 (gradient checks).
pub fn accumulation_dtype(compute: DType) -> DType {
    if compute == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last axis, in f32: x / sqrt(mean(x^2) + eps) * gain.
/// x [.., D], gain [D] -> [.., D] in x's dtype.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let acc = accumulation_dtype(x.dtype());
    let xf = x.convert(acc)?;
    let mut keep = x.dims();
    *keep.last_mut().expect("rank >= 1") = 1;
    let ms = xf.square()?.mean(&[-1])?.reshape(&keep)?;
    xf.mul(&ms.add_scalar(eps)?.rsqrt()?)?
        .mul(&gain.convert(acc)?)?
        .convert(x.dtype())
}

/// cos and sin tables [S, Hd] over the frequency vector [f, f] (HF LLaMA),
/// computed in f32 from positions 0..S.
pub fn rope_tables(x: &Tensor, seq: i64, head_dim: i64, theta: f64) -> Result<(Tensor, Tensor)> {
    let acc = accumulation_dtype(x.dtype());
    let pos = x.graph().iota(TensorType::new(acc, &[seq, 1]), 0)?;
    rope_at_positions(&pos, head_dim, theta)
}

/// The tables [1, Hd] of the one run-time position `pos` (an integer
/// scalar): decoding with a cache.
pub fn rope_at(x: &Tensor, pos: &Tensor, head_dim: i64, theta: f64) -> Result<(Tensor, Tensor)> {
    let acc = accumulation_dtype(x.dtype());
    rope_at_positions(&pos.convert(acc)?.reshape(&[1, 1])?, head_dim, theta)
}

/// cos and sin [S, Hd] of positions [S, 1] (in the accumulation dtype).
fn rope_at_positions(pos: &Tensor, head_dim: i64, theta: f64) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| theta.powf(-(2 * i) as f64 / head_dim as f64))
        .collect();
    let inv_freq = pos
        .graph()
        .constant(&inv_freq, TensorType::new(pos.dtype(), &[1, half]))?;
    let angles = pos.mul(&inv_freq)?; // [S, Hd/2]
    let emb = concatenate(&[&angles, &angles], 1)?; // [S, Hd]
    Ok((emb.cos()?, emb.sin()?))
}

/// Rotary embedding of x [B, S, N, Hd] with tables [S, Hd]:
/// x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(-1)?;
    let s = x.dim(1)?;
    let (x1, x2) = (x.slice_axis(-1, 0, hd / 2)?, x.slice_axis(-1, hd / 2, hd)?);
    let rotated = concatenate(&[&x2.neg()?, &x1], -1)?;
    let table = |t: &Tensor| t.convert(x.dtype())?.reshape(&[1, s, 1, hd]);
    x.mul(&table(cos)?)?.add(&rotated.mul(&table(sin)?)?)
}

/// The head layout of attention: H query heads sharing K key/value heads,
/// and the epsilon of the per-head q/k RMSNorm where the weights have one.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: i64,
    pub kv_heads: i64,
    pub norm_eps: f64,
}

/// Queries [B, K, G, S, Hd], keys and values [B, K, S, Hd] of x [B, S, D]:
/// the per-head RMSNorm on queries and keys where `w` has one (Qwen3),
/// then RoPE. Hd is q's rows / H, which need not be D / H.
fn project_qkv(
    x: &Tensor,
    w: &Attention<Tensor>,
    shape: Heads,
    rope: &(Tensor, Tensor),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (heads, kv_heads) = (shape.heads, shape.kv_heads);
    let (b, s) = (x.dim(0)?, x.dim(1)?);
    let hd = w.q.dim(0)? / heads;
    let groups = heads / kv_heads;
    let mut q = x.linear(&w.q)?.reshape(&[b, s, heads, hd])?;
    let mut k = x.linear(&w.k)?.reshape(&[b, s, kv_heads, hd])?;
    if let Some(n) = &w.qk_norm {
        q = rms_norm(&q, &n.q, shape.norm_eps)?;
        k = rms_norm(&k, &n.k, shape.norm_eps)?;
    }
    let q = apply_rope(&q, &rope.0, &rope.1)?;
    let k = apply_rope(&k, &rope.0, &rope.1)?;
    let v = x.linear(&w.v)?.reshape(&[b, s, kv_heads, hd])?;
    let q = q
        .reshape(&[b, s, kv_heads, groups, hd])?
        .transpose(&[0, 2, 3, 1, 4])?; // [B, K, G, S, Hd]
    let k = k.transpose(&[0, 2, 1, 3])?; // [B, K, S, Hd]
    let v = v.transpose(&[0, 2, 1, 3])?; // [B, K, S, Hd]
    Ok((q, k, v))
}

/// softmax(q k^T / sqrt(Hd) where `allowed`) v, the heads side by side:
/// q [B, K, G, Sq, Hd], k and v [B, K, Sk, Hd], allowed [Sq, Sk] (bool)
/// -> [B, Sq, H * Hd], the input of the output projection.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, allowed: &Tensor) -> Result<Tensor> {
    let (b, sq, hd) = (q.dim(0)?, q.dim(3)?, q.dim(4)?);
    let width = q.dim(1)? * q.dim(2)? * hd; // H * Hd
    let acc = accumulation_dtype(q.dtype());
    let qk = DotDims {
        lhs_contract: vec![4],
        rhs_contract: vec![3],
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 1],
    };
    let scores = q
        .dot_general_as(k, &qk, acc)?
        .mul_scalar(1.0 / (hd as f64).sqrt())?; // [B, K, G, Sq, Sk]
    let mask = allowed
        .reshape(&[1, 1, 1, sq, k.dim(2)?])?
        .broadcast_to(&scores.dims())?;
    let scores = mask.select(&scores, &scores.full_like(-1e30)?)?;
    let probs = scores.softmax(-1)?.convert(q.dtype())?;
    let pv = DotDims {
        lhs_contract: vec![4],
        rhs_contract: vec![2],
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 1],
    };
    let out = probs.dot_general(v, &pv)?; // [B, K, G, Sq, Hd]
    out.transpose(&[0, 3, 1, 2, 4])?.reshape(&[b, sq, width])
}

/// Causal grouped-query attention before its output projection (`w.o`,
/// which the caller applies: the heads' outputs are the input of that
/// linear layer). x [B, S, D] -> [B, S, H * Hd]; H query heads share K
/// key/value heads in groups of G = H / K; softmax in f32 with scale
/// 1/sqrt(Hd).
pub fn attention_heads(
    x: &Tensor,
    w: &Attention<Tensor>,
    shape: Heads,
    rope: &(Tensor, Tensor),
) -> Result<Tensor> {
    let s = x.dim(1)?;
    let (q, k, v) = project_qkv(x, w, shape, rope)?;
    let g = x.graph();
    let row = g.iota(TensorType::new(DType::I32, &[s, s]), 0)?;
    let col = g.iota(TensorType::new(DType::I32, &[s, s]), 1)?;
    attend(&q, &k, &v, &col.le(&row)?)
}

/// One decoding position of causal attention with a key/value cache,
/// before the output projection as [`attention_heads`]. x [B, 1, D] at
/// run-time position `pos` (i32 scalar; `rope` its tables [1, Hd]); caches
/// [B, K, Smax, Hd] holding positions 0..pos-1. Returns the heads' outputs
/// [B, 1, H * Hd] and the caches with this position written.
pub fn attention_heads_cached(
    x: &Tensor,
    w: &Attention<Tensor>,
    shape: Heads,
    rope: &(Tensor, Tensor),
    pos: &Tensor,
    (cache_k, cache_v): (&Tensor, &Tensor),
) -> Result<(Tensor, Tensor, Tensor)> {
    let (q, k, v) = project_qkv(x, w, shape, rope)?;
    let zero = pos.scalar_like(0.0)?;
    let starts = [&zero, &zero, pos, &zero];
    let cache_k = cache_k.dynamic_update_slice(&k.convert(cache_k.dtype())?, &starts)?;
    let cache_v = cache_v.dynamic_update_slice(&v.convert(cache_v.dtype())?, &starts)?;
    let smax = cache_k.dim(2)?;
    let col = x.graph().iota(TensorType::new(DType::I32, &[1, smax]), 1)?;
    let allowed = col.le(&pos
        .convert(DType::I32)?
        .reshape(&[1, 1])?
        .broadcast_to(&[1, smax])?)?;
    let out = attend(
        &q,
        &cache_k.convert(x.dtype())?,
        &cache_v.convert(x.dtype())?,
        &allowed,
    )?;
    Ok((out, cache_k, cache_v))
}

/// silu(x) = x * sigmoid(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.mul(&x.logistic()?)
}

/// The SwiGLU MLP's hidden activations silu(gate(x)) * up(x), the input of
/// its down projection (down(..) is the MLP). x [.., D], gate/up [F, D]
/// -> [.., F].
pub fn swiglu_hidden(x: &Tensor, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    silu(&x.linear(gate)?)?.mul(&x.linear(up)?)
}
