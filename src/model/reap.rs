//! REAP saliency (Lasby et al., CerebrasResearch/reap `pruning_metrics.py`)
//! over a model's experts: S_j = (1/|X_j|) sum_{x in X_j} g_j(x) ||f_j(x)||_2,
//! X_j the tokens routed to expert j, g_j(x) its routing weight, f_j(x) its
//! raw output before gating. Averaged over the tokens routed to j, not over
//! all tokens. For a pool (shared or pooled MoE) X_j gathers j's tokens at
//! every layer; for a per-layer MoE each (layer, expert) is its own unit.
//!
//! The program traces the routing ([`super::routing::trace_program`]) and
//! each chosen expert's output on its token; the sums are kept on the host.

use serde::{Deserialize, Serialize};

use crate::graph::{DType, DotDims, Function, HostTensor, Result, Tensor};

use super::config::{FfnKind, ModelConfig};
use super::layers::silu;
use super::params::{LayerFfn, Mlp, Params};
use super::routing::{routed_layers, trace_program, ExpertPool};

/// The experts layer `l` routes to: the pool, or its own.
fn layer_experts(params: &Params<Tensor>, l: i64) -> Result<&Mlp<Tensor>> {
    let layer = &params.layers[l as usize];
    match (&layer.ffn, &params.shared_moe) {
        (LayerFfn::Moe(m), _) => Ok(&m.experts),
        (LayerFfn::Shared | LayerFfn::Pooled { .. }, Some(pool)) => Ok(&pool.experts),
        _ => Err(crate::graph::GraphError::Usage(format!(
            "layer {l} has no experts"
        ))),
    }
}

/// ||f_e(x)||_2 of the chosen experts `experts` [N, k] (i32) on their
/// tokens x [N, D]: [N, k], computing only the N*k chosen pairs.
pub fn chosen_output_norms(x: &Tensor, w: &Mlp<Tensor>, experts: &Tensor) -> Result<Tensor> {
    let (n, k, d) = (experts.dim(0)?, experts.dim(1)?, x.dim(1)?);
    let ids = experts.reshape(&[n * k])?;
    let rows = x
        .reshape(&[n, 1, d])?
        .broadcast_in_dim(&[n, k, d], &[0, 1, 2])?
        .reshape(&[n * k, d])?;
    let batched = DotDims {
        lhs_contract: vec![1],
        rhs_contract: vec![2],
        lhs_batch: vec![0],
        rhs_batch: vec![0],
    };
    let gate = rows.dot_general(&w.gate.take(&ids)?, &batched)?; // [N*k, F]
    let up = rows.dot_general(&w.up.take(&ids)?, &batched)?;
    let h = silu(&gate)?.mul(&up)?;
    let out = h.dot_general(&w.down.take(&ids)?, &batched)?; // [N*k, D]
    out.square()?.reduce_sum(&[1])?.sqrt()?.reshape(&[n, k])
}

/// The REAP program ([`trace_program`]): per layer experts [N, k] (i32),
/// weights [N, k] (f32), the chosen experts' output norms [N, k] (f32).
pub fn reap_program(
    cfg: &ModelConfig,
    compute: DType,
    rows: i64,
    seq_len: i64,
) -> Result<Function> {
    trace_program(cfg, compute, (rows, seq_len), "reap", |l, params| {
        let w = layer_experts(params, l.layer)?;
        let dtype = l.input.dtype();
        let w = Mlp {
            gate: w.gate.convert(dtype)?,
            up: w.up.convert(dtype)?,
            down: w.down.convert(dtype)?,
        };
        let norms = chosen_output_norms(&l.input, &w, &l.experts)?;
        Ok(vec![
            l.experts,
            l.weights.convert(DType::F32)?,
            norms.convert(DType::F32)?,
        ])
    })
}

/// REAP sums over calibration tokens, per traced layer and expert.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReapStats {
    pub pool: ExpertPool,
    /// The model layer of each traced row.
    pub layer_ids: Vec<usize>,
    /// Experts per layer (per-layer MoE) or in the pool.
    pub experts: usize,
    pub k: usize,
    /// Tokens seen (each through every traced layer).
    pub tokens: u64,
    /// [l][e]: tokens routed to e at traced layer l.
    pub count: Vec<Vec<u64>>,
    /// [l][e]: sum over those tokens of g_e(x) ||f_e(x)||.
    pub saliency_sum: Vec<Vec<f64>>,
}

/// One prunable unit's statistics: an expert of the pool (layer None) or
/// of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnitStats {
    pub layer: Option<usize>,
    pub expert: usize,
    /// REAP saliency (0 for an expert never chosen).
    pub reap: f64,
    /// Times chosen (|X_j|).
    pub frequency: u64,
}

impl ReapStats {
    pub fn new(cfg: &ModelConfig) -> ReapStats {
        let layer_ids: Vec<usize> = routed_layers(cfg).iter().map(|&l| l as usize).collect();
        let (l, e) = (layer_ids.len(), cfg.num_experts as usize);
        ReapStats {
            pool: match cfg.ffn {
                FfnKind::Moe => ExpertPool::PerLayer,
                _ => ExpertPool::Shared,
            },
            layer_ids,
            experts: e,
            k: cfg.experts_per_token as usize,
            tokens: 0,
            count: vec![vec![0; e]; l],
            saliency_sum: vec![vec![0.0; e]; l],
        }
    }

    /// Adds one batch of [`reap_program`]'s results.
    pub fn add(&mut self, outs: &[HostTensor]) -> std::result::Result<(), String> {
        if outs.len() != 3 * self.layer_ids.len() {
            return Err(format!(
                "{} results for {} layers x 3",
                outs.len(),
                self.layer_ids.len()
            ));
        }
        let mut n = 0;
        for (l, r) in outs.chunks(3).enumerate() {
            let (ids, w, norm) = (r[0].to_f64(), r[1].to_f64(), r[2].to_f64());
            n = ids.len() / self.k.max(1);
            for ((&e, &g), &f) in ids.iter().zip(&w).zip(&norm) {
                let e = e as usize;
                if e >= self.experts {
                    return Err(format!("layer row {l}: expert {e} of {}", self.experts));
                }
                self.count[l][e] += 1;
                self.saliency_sum[l][e] += g * f;
            }
        }
        self.tokens += n as u64;
        Ok(())
    }

    /// Every prunable unit: the pool's experts (their tokens at every
    /// layer together), or each layer's.
    pub fn units(&self) -> Vec<UnitStats> {
        let unit = |layer, expert, count: u64, sum: f64| UnitStats {
            layer,
            expert,
            reap: if count == 0 { 0.0 } else { sum / count as f64 },
            frequency: count,
        };
        match self.pool {
            ExpertPool::Shared => (0..self.experts)
                .map(|e| {
                    let count = self.count.iter().map(|c| c[e]).sum();
                    let sum = self.saliency_sum.iter().map(|s| s[e]).sum();
                    unit(None, e, count, sum)
                })
                .collect(),
            ExpertPool::PerLayer => self
                .layer_ids
                .iter()
                .enumerate()
                .flat_map(|(l, &layer)| {
                    (0..self.experts).map(move |e| {
                        unit(Some(layer), e, self.count[l][e], self.saliency_sum[l][e])
                    })
                })
                .collect(),
        }
    }
}
