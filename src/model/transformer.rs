//! The whole model: embeddings, the pre-norm blocks, the final norm, tied
//! output logits, and the next-token loss.

use crate::graph::{DType, GraphError, Mesh, Result, Sharding, Tensor};

use super::config::ModelConfig;
use super::layers::{
    accumulation_dtype, attention, attention_cached, rms_norm, rope_at, rope_tables, swiglu,
};
use super::moe::{shared_moe, ExpertCompute};
use super::params::{Attention, Layer, LayerFfn, Mlp, Moe, Params};

/// The model traced over its parameter tree.
pub struct Transformer<'a> {
    cfg: &'a ModelConfig,
    params: &'a Params<Tensor>,
    /// The shared MoE block's weights in the compute dtype, converted once
    /// for all the layers that use it.
    shared_moe: Option<Moe<Tensor>>,
    /// Dtype of matmul operands (parameters are converted at use).
    compute: DType,
    experts: ExpertCompute,
    /// Set when the program is partitioned over a mesh: the shared MoE
    /// then runs on each device's own tokens.
    per_device: Option<PerDeviceMoe>,
}

/// The shared MoE in a manually partitioned region (JAX's shard_map):
/// each device routes, sorts and computes the experts of its own tokens,
/// with the whole weights, and balances its own load, as one replica per
/// device did. Left to the SPMD partitioner, the routing's sort and the
/// expert blocks' loop over all the batch's tokens would be computed
/// whole on every device (measured: the 2-device step 1.35x slower).
struct PerDeviceMoe {
    /// Tokens [N, D]: split along N over every device.
    tokens: Sharding,
    /// One balance loss per device, [G].
    losses: Sharding,
    /// The weights in the compute dtype, whole on each device, inside
    /// the region.
    weights: Moe<Tensor>,
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
    /// The model `cfg` over `params` (f32 leaves, e.g. from
    /// [`declare_params`](super::params::declare_params)), computing its
    /// matmuls in `compute`.
    pub fn new(
        cfg: &'a ModelConfig,
        params: &'a Params<Tensor>,
        compute: DType,
    ) -> Result<Transformer<'a>> {
        if params.layers.len() as i64 != cfg.num_layers {
            return Err(GraphError::Usage(format!(
                "{} layers of parameters for a model of model.num_layers = {}",
                params.layers.len(),
                cfg.num_layers
            )));
        }
        // The shared block's weights once, not once per layer. (Their
        // gradient is then summed over the layers in the compute dtype.)
        let shared_moe = match &params.shared_moe {
            Some(m) => Some(Moe {
                router: m.router.convert(compute)?,
                experts: Mlp {
                    gate: m.experts.gate.convert(compute)?,
                    up: m.experts.up.convert(compute)?,
                    down: m.experts.down.convert(compute)?,
                },
            }),
            None => None,
        };
        Ok(Transformer {
            cfg,
            params,
            shared_moe,
            compute,
            experts: ExpertCompute::Routed {
                block: cfg.moe_block_size,
            },
            per_device: None,
        })
    }

    /// For a program partitioned over `mesh` whose batch is split over all
    /// its devices: runs the shared MoE per device ([`PerDeviceMoe`]); the
    /// balance loss is then the mean of the devices'. Nothing changes on
    /// one device.
    pub fn with_moe_per_device(mut self, mesh: &Mesh) -> Result<Self> {
        let Some(moe) = &self.shared_moe else {
            return Ok(self);
        };
        if mesh.devices() == 1 {
            return Ok(self);
        }
        let axes: Vec<&str> = mesh.axis_names().collect();
        let whole = |t: &Tensor| t.to_manual(&Sharding::replicated(mesh, t.rank()));
        self.per_device = Some(PerDeviceMoe {
            tokens: Sharding::split(mesh, 2, 0, &axes)?,
            losses: Sharding::split(mesh, 1, 0, &axes)?,
            weights: Moe {
                router: whole(&moe.router)?,
                experts: Mlp {
                    gate: whole(&moe.experts.gate)?,
                    up: whole(&moe.experts.up)?,
                    down: whole(&moe.experts.down)?,
                },
            },
        });
        Ok(self)
    }

    /// Computes the experts as `experts` says: routed (the default) or
    /// every expert on every token (the same values, for checks).
    pub fn with_expert_compute(mut self, experts: ExpertCompute) -> Self {
        self.experts = experts;
        self
    }

    /// A parameter in the compute dtype.
    fn p(&self, t: &Tensor) -> Result<Tensor> {
        t.convert(self.compute)
    }

    /// Layer `i`'s parameters.
    fn layer_params(&self, i: i64) -> Result<&'a Layer<Tensor>> {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.params.layers.get(i))
            .ok_or_else(|| {
                GraphError::Usage(format!(
                    "layer {i} of a model of {} layers",
                    self.params.layers.len()
                ))
            })
    }

    /// The shared MoE block (in the compute dtype).
    fn shared_moe(&self) -> Result<&Moe<Tensor>> {
        self.shared_moe.as_ref().ok_or_else(|| {
            GraphError::Usage("a layer uses the shared MoE block, which this model lacks".into())
        })
    }

    /// The shared router [E, D] in the compute dtype, as the MoE block uses
    /// it (None for a dense model).
    pub fn shared_router(&self) -> Option<&Tensor> {
        self.shared_moe.as_ref().map(|m| &m.router)
    }

    /// Input embeddings [B, S, D] of tokens [B, S] (through the factorised
    /// projection when the model has one).
    pub fn embed(&self, inputs: &Tensor) -> Result<Tensor> {
        let e = &self.params.embed;
        let h = self.p(&e.table)?.take(inputs)?; // [B, S, D] or [B, S, e]
        match &e.proj {
            Some(proj) => h.linear(&self.p(proj)?),
            None => Ok(h),
        }
    }

    /// Layer `i`'s attention projections in the compute dtype.
    fn attention_params(&self, i: i64) -> Result<Attention<Tensor>> {
        let a = &self.layer_params(i)?.attn;
        Ok(Attention {
            q: self.p(&a.q)?,
            k: self.p(&a.k)?,
            v: self.p(&a.v)?,
            o: self.p(&a.o)?,
        })
    }

    /// Layer `i`'s pre-attention RMSNorm of h [B, S, D].
    pub fn attention_norm(&self, i: i64, h: &Tensor) -> Result<Tensor> {
        let gain = self.p(&self.layer_params(i)?.attn_norm)?;
        rms_norm(h, &gain, self.cfg.rms_norm_eps)
    }

    /// Layer `i`'s pre-FFN RMSNorm of h [B, S, D]: the input of its MLP, or
    /// of the shared router and experts.
    pub fn ffn_norm(&self, i: i64, h: &Tensor) -> Result<Tensor> {
        let gain = self.p(&self.layer_params(i)?.ffn_norm)?;
        rms_norm(h, &gain, self.cfg.rms_norm_eps)
    }

    /// Layer `i`'s feed-forward half, residual included: h + FFN(RMSNorm(h))
    /// for h [B, S, D], and the balance loss of the shared MoE (None for a
    /// dense model).
    pub fn ffn_block(&self, i: i64, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let c = self.cfg;
        let x = self.ffn_norm(i, h)?;
        let (y, aux) = match &self.layer_params(i)?.ffn {
            LayerFfn::Mlp(m) => (
                swiglu(&x, &self.p(&m.gate)?, &self.p(&m.up)?, &self.p(&m.down)?)?,
                None,
            ),
            LayerFfn::Shared => {
                let (b, s, d) = (x.dim(0)?, x.dim(1)?, c.hidden_size);
                let tokens = x.reshape(&[b * s, d])?;
                let k = c.experts_per_token;
                let (y, aux) = match &self.per_device {
                    None => shared_moe(&tokens, self.shared_moe()?, k, self.experts)?,
                    Some(p) => {
                        let local = tokens.to_manual(&p.tokens)?;
                        let (y, aux) = shared_moe(&local, &p.weights, k, self.experts)?;
                        let losses = aux.reshape(&[1])?.from_manual(&p.losses)?;
                        (y.from_manual(&p.tokens)?, losses.mean(&[0])?)
                    }
                };
                (y.reshape(&[b, s, d])?, Some(aux))
            }
        };
        Ok((h.add(&y)?, aux))
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        rms_norm(h, &self.p(&self.params.norm)?, self.cfg.rms_norm_eps)
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
        attend: impl FnOnce(&Tensor, &Attention<Tensor>) -> Result<(Tensor, T)>,
        observe: &mut dyn FnMut(i64, &Tensor) -> Result<()>,
    ) -> Result<(Tensor, Option<Tensor>, T)> {
        let weights = self.attention_params(i)?;
        let x = self.attention_norm(i, h)?;
        let (a, extra) = attend(&x, &weights)?;
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
            let attend = |x: &Tensor, w: &Attention<Tensor>| {
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
        let e = &self.params.embed;
        let table = self.p(&e.table)?;
        let h = match &e.proj {
            Some(proj) => h.matmul(&self.p(proj)?)?,
            None => h.clone(),
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
