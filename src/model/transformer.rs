//! The whole model: embeddings, the pre-norm blocks, the final norm, tied
//! output logits, and the next-token loss.

use std::collections::HashMap;

use crate::graph::{DType, GraphError, Result, Tensor};

use super::config::{FfnKind, ModelConfig};
use super::layers::{
    accumulation_dtype, attention, rms_norm, rope_tables, swiglu, AttentionWeights,
};
use super::moe::{shared_moe, ExpertCompute, MoeWeights};

/// The model traced over a set of named parameter tensors.
pub struct Transformer<'a> {
    cfg: &'a ModelConfig,
    params: HashMap<String, Tensor>,
    /// Dtype of matmul operands (parameters are converted at use).
    compute: DType,
    experts: ExpertCompute,
}

/// The loss of one batch, kept in parts.
pub struct Loss {
    /// Mean next-token cross-entropy over every position.
    pub ce: Tensor,
    /// Mean over layers of the balance loss (0 for dense models).
    pub aux: Tensor,
    /// ce + aux_loss_coef * aux: what is differentiated.
    pub total: Tensor,
}

impl<'a> Transformer<'a> {
    /// `params` are (name, tensor) pairs named as in
    /// [`param_specs`](super::params::param_specs).
    pub fn new(
        cfg: &'a ModelConfig,
        params: &[(String, Tensor)],
        compute: DType,
    ) -> Transformer<'a> {
        Transformer {
            cfg,
            params: params.iter().cloned().collect(),
            compute,
            experts: ExpertCompute::Routed {
                block: cfg.moe_block_size,
            },
        }
    }

    /// Evaluate experts densely instead of routed (same values).
    pub fn with_expert_compute(mut self, experts: ExpertCompute) -> Self {
        self.experts = experts;
        self
    }

    /// A parameter in the compute dtype.
    fn p(&self, name: &str) -> Result<Tensor> {
        match self.params.get(name) {
            Some(t) => t.convert(self.compute),
            None => Err(GraphError::Usage(format!(
                "model parameter `{name}` was not provided"
            ))),
        }
    }

    /// Final hidden states [B, S, D] for input tokens [B, S], and the mean
    /// balance loss over layers.
    pub fn hidden(&self, inputs: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = self.cfg;
        let (b, s) = (inputs.dim(0)?, inputs.dim(1)?);
        let table = self.p("model.embed_tokens.weight")?;
        let mut h = table.take(inputs)?; // [B, S, D] or [B, S, e]
        if c.embedding_dim > 0 {
            h = h.linear(&self.p("model.embed_proj.weight")?)?;
        }
        let rope = rope_tables(&h, s, c.head_dim(), c.rope_theta)?;
        let acc = accumulation_dtype(self.compute);
        let mut aux_sum = inputs.graph().scalar(0.0, acc)?;
        for i in 0..c.num_layers {
            let l = |n: &str| self.p(&format!("model.layers.{i}.{n}"));
            let (q, k, v, o) = (
                l("self_attn.q_proj.weight")?,
                l("self_attn.k_proj.weight")?,
                l("self_attn.v_proj.weight")?,
                l("self_attn.o_proj.weight")?,
            );
            let x = rms_norm(&h, &l("input_layernorm.weight")?, c.rms_norm_eps)?;
            h = h.add(&attention(
                &x,
                &AttentionWeights {
                    q: &q,
                    k: &k,
                    v: &v,
                    o: &o,
                },
                c.num_heads,
                c.num_kv_heads,
                &rope,
            )?)?;
            let x = rms_norm(&h, &l("post_attention_layernorm.weight")?, c.rms_norm_eps)?;
            let y = match c.ffn {
                FfnKind::Dense => swiglu(
                    &x,
                    &l("mlp.gate_proj.weight")?,
                    &l("mlp.up_proj.weight")?,
                    &l("mlp.down_proj.weight")?,
                )?,
                FfnKind::SharedMoe => {
                    let w = MoeWeights {
                        router: &self.p("model.shared_moe.router.weight")?,
                        gate: &self.p("model.shared_moe.experts.gate_proj")?,
                        up: &self.p("model.shared_moe.experts.up_proj")?,
                        down: &self.p("model.shared_moe.experts.down_proj")?,
                    };
                    let d = c.hidden_size;
                    let (y, aux) = shared_moe(
                        &x.reshape(&[b * s, d])?,
                        &w,
                        c.experts_per_token,
                        self.experts,
                    )?;
                    aux_sum = aux_sum.add(&aux)?;
                    y.reshape(&[b, s, d])?
                }
            };
            h = h.add(&y)?;
        }
        let h = rms_norm(&h, &self.p("model.norm.weight")?, c.rms_norm_eps)?;
        Ok((h, aux_sum.mul_scalar(1.0 / c.num_layers as f64)?))
    }

    /// Logits [B, S, V] in f32 (f64 for f64 models) through the tied
    /// (possibly factorised) embedding.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let acc = accumulation_dtype(self.compute);
        let table = self.p("model.embed_tokens.weight")?;
        let h = if self.cfg.embedding_dim > 0 {
            h.matmul(&self.p("model.embed_proj.weight")?)?
        } else {
            h.clone()
        };
        let dims = crate::graph::DotDims {
            lhs_contract: vec![2],
            rhs_contract: vec![1],
            ..Default::default()
        };
        h.dot_general_as(&table, &dims, acc)
    }

    /// Loss of a batch of windows [B, S + 1]: inputs are window[:, :-1],
    /// targets window[:, 1:].
    pub fn loss(&self, windows: &Tensor) -> Result<Loss> {
        let (b, s1) = (windows.dim(0)?, windows.dim(1)?);
        let s = s1 - 1;
        let inputs = windows.slice_axis(1, 0, s)?;
        let targets = windows.slice_axis(1, 1, s1)?;
        let (h, aux) = self.hidden(&inputs)?;
        let v = self.cfg.vocab_size;
        let logits = self.logits(&h)?.reshape(&[b * s, v])?;
        let lse = logits.logsumexp(-1)?.reshape(&[b * s])?;
        let g = windows.graph();
        let row = g.iota(crate::graph::TensorType::new(DType::I32, &[b * s]), 0)?;
        let flat_index = row
            .mul_scalar(v as f64)?
            .add(&targets.reshape(&[b * s])?.convert(DType::I32)?)?;
        let picked = logits.reshape(&[b * s * v])?.take(&flat_index)?;
        let ce = lse.sub(&picked)?.mean_all()?;
        let total = if self.cfg.is_moe() {
            ce.add(&aux.mul_scalar(self.cfg.aux_loss_coef)?)?
        } else {
            ce.clone()
        };
        Ok(Loss { ce, aux, total })
    }
}
