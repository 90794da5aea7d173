//! The whole model: embeddings, the pre-norm blocks, the final norm, tied
//! output logits, and the next-token loss.

use std::collections::HashMap;

use crate::graph::{DType, GraphError, Result, Tensor};

use super::config::{FfnKind, ModelConfig};
use super::layers::{
    accumulation_dtype, attention, attention_cached, rms_norm, rope_at, rope_tables, swiglu,
    AttentionWeights,
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

    /// Input embeddings [B, S, D] of tokens [B, S] (through the factorised
    /// projection when the model has one).
    pub fn embed(&self, inputs: &Tensor) -> Result<Tensor> {
        let h = self.p("model.embed_tokens.weight")?.take(inputs)?; // [B, S, D] or [B, S, e]
        if self.cfg.embedding_dim > 0 {
            return h.linear(&self.p("model.embed_proj.weight")?);
        }
        Ok(h)
    }

    /// Layer `i`'s parameter `name`.
    fn layer_param(&self, i: i64, name: &str) -> Result<Tensor> {
        self.p(&format!("model.layers.{i}.{name}"))
    }

    /// Layer `i`'s attention projections (q, k, v, o).
    fn attention_params(&self, i: i64) -> Result<[Tensor; 4]> {
        Ok([
            self.layer_param(i, "self_attn.q_proj.weight")?,
            self.layer_param(i, "self_attn.k_proj.weight")?,
            self.layer_param(i, "self_attn.v_proj.weight")?,
            self.layer_param(i, "self_attn.o_proj.weight")?,
        ])
    }

    /// Layer `i`'s pre-attention RMSNorm of h [B, S, D].
    pub fn attention_norm(&self, i: i64, h: &Tensor) -> Result<Tensor> {
        rms_norm(
            h,
            &self.layer_param(i, "input_layernorm.weight")?,
            self.cfg.rms_norm_eps,
        )
    }

    /// Layer `i`'s feed-forward half, residual included: h + FFN(RMSNorm(h))
    /// for h [B, S, D], and the balance loss of the shared MoE (None for a
    /// dense model).
    pub fn ffn_block(&self, i: i64, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let c = self.cfg;
        let x = self.ffn_norm(i, h)?;
        let (y, aux) = match c.ffn {
            FfnKind::Dense => (
                swiglu(
                    &x,
                    &self.layer_param(i, "mlp.gate_proj.weight")?,
                    &self.layer_param(i, "mlp.up_proj.weight")?,
                    &self.layer_param(i, "mlp.down_proj.weight")?,
                )?,
                None,
            ),
            FfnKind::SharedMoe => {
                let w = MoeWeights {
                    router: &self.p("model.shared_moe.router.weight")?,
                    gate: &self.p("model.shared_moe.experts.gate_proj")?,
                    up: &self.p("model.shared_moe.experts.up_proj")?,
                    down: &self.p("model.shared_moe.experts.down_proj")?,
                };
                let (b, s, d) = (x.dim(0)?, x.dim(1)?, c.hidden_size);
                let (y, aux) = shared_moe(
                    &x.reshape(&[b * s, d])?,
                    &w,
                    c.experts_per_token,
                    self.experts,
                )?;
                (y.reshape(&[b, s, d])?, Some(aux))
            }
        };
        Ok((h.add(&y)?, aux))
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        rms_norm(h, &self.p("model.norm.weight")?, self.cfg.rms_norm_eps)
    }

    /// Layer `i`'s pre-FFN RMSNorm of h [B, S, D]: the input of its MLP, or
    /// of the shared router and experts.
    pub fn ffn_norm(&self, i: i64, h: &Tensor) -> Result<Tensor> {
        rms_norm(
            h,
            &self.layer_param(i, "post_attention_layernorm.weight")?,
            self.cfg.rms_norm_eps,
        )
    }

    /// Final hidden states [B, S, D] for input tokens [B, S], and the mean
    /// balance loss over layers.
    pub fn hidden(&self, inputs: &Tensor) -> Result<(Tensor, Tensor)> {
        self.hidden_observed(inputs, &mut |_, _| Ok(()))
    }

    /// [`hidden`](Self::hidden), calling `observe(i, h)` with the residual
    /// stream h [B, S, D] entering layer `i`'s FFN half (after its
    /// attention) as it is traced; the traced forward is unchanged. For
    /// analyses such as `model::routing`.
    pub fn hidden_observed(
        &self,
        inputs: &Tensor,
        observe: &mut dyn FnMut(i64, &Tensor) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let c = self.cfg;
        let s = inputs.dim(1)?;
        let mut h = self.embed(inputs)?;
        let rope = rope_tables(&h, s, c.head_dim(), c.rope_theta)?;
        let acc = accumulation_dtype(self.compute);
        let mut aux_sum = inputs.graph().scalar(0.0, acc)?;
        for i in 0..c.num_layers {
            let (next, aux, ()) = self.layer(
                i,
                &h,
                |x, w| Ok((attention(x, w, c.num_heads, c.num_kv_heads, &rope)?, ())),
                observe,
            )?;
            h = next;
            if let Some(aux) = aux {
                aux_sum = aux_sum.add(&aux)?;
            }
        }
        let h = self.final_norm(&h)?;
        Ok((h, aux_sum.mul_scalar(1.0 / c.num_layers as f64)?))
    }

    /// Layer `i` on the residual stream h [B, S, D]: h + attend(RMSNorm(h),
    /// weights), then `observe(i, h)`, then the FFN half. `attend` is full
    /// attention (training) or one cached position (decoding); what else it
    /// returns (the updated caches) is passed through. Returns the new h,
    /// the layer's balance loss (None for a dense model) and that value.
    fn layer<T>(
        &self,
        i: i64,
        h: &Tensor,
        attend: impl FnOnce(&Tensor, &AttentionWeights) -> Result<(Tensor, T)>,
        observe: &mut dyn FnMut(i64, &Tensor) -> Result<()>,
    ) -> Result<(Tensor, Option<Tensor>, T)> {
        let params = self.attention_params(i)?;
        let x = self.attention_norm(i, h)?;
        let (a, extra) = attend(&x, &AttentionWeights::from(&params))?;
        let h = h.add(&a)?;
        observe(i, &h)?;
        let (h, aux) = self.ffn_block(i, &h)?;
        Ok((h, aux, extra))
    }

    /// One decoding position with key/value caches: tokens [B, 1] at
    /// run-time position `pos` (i32 scalar), caches[l] = (k, v)
    /// [B, K, Smax, Hd] holding positions 0..pos-1. Returns the final
    /// hidden states [B, 1, D] and the caches with `pos` written.
    pub fn decode(
        &self,
        tokens: &Tensor,
        pos: &Tensor,
        caches: &[(Tensor, Tensor)],
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let c = self.cfg;
        let mut h = self.embed(tokens)?;
        let rope = rope_at(&h, pos, c.head_dim(), c.rope_theta)?;
        let mut out = Vec::with_capacity(caches.len());
        for (i, (ck, cv)) in (0..c.num_layers).zip(caches) {
            let attend = |x: &Tensor, w: &AttentionWeights| {
                let (a, ck, cv) =
                    attention_cached(x, w, c.num_heads, c.num_kv_heads, &rope, pos, ck, cv)?;
                Ok((a, (ck, cv)))
            };
            let (next, _, cache) = self.layer(i, &h, attend, &mut |_, _| Ok(()))?;
            h = next;
            out.push(cache);
        }
        Ok((self.final_norm(&h)?, out))
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
        // The target's logit through a one-hot mask rather than a gather:
        // the gradient is then softmax - one_hot, one elementwise pass that
        // XLA fuses, where a gather's gradient is a scatter into another
        // zeroed [B*S, V] buffer. Exact: the other terms add zeros.
        let g = windows.graph();
        let vocab = g.iota(crate::graph::TensorType::new(DType::I32, &[1, v]), 1)?;
        let target = targets.reshape(&[b * s, 1])?.convert(DType::I32)?;
        let picked = vocab
            .eq(&target)?
            .select(&logits, &logits.zeros_like()?)?
            .reduce_sum(&[1])?;
        let ce = lse.sub(&picked)?.mean_all()?;
        let total = if self.cfg.is_moe() {
            ce.add(&aux.mul_scalar(self.cfg.aux_loss_coef)?)?
        } else {
            ce.clone()
        };
        Ok(Loss { ce, aux, total })
    }
}
