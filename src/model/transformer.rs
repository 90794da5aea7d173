//! The whole model: embeddings, the pre-norm blocks, the final norm, tied
//! output logits, and the next-token loss.

use crate::graph::{DType, GraphError, Mesh, Result, Sharding, Tensor, TensorType};

use super::config::PoolScope;
use super::config::{FfnKind, ModelConfig, RouterScore};
use super::distill::distill_term;
use super::layers::{
    accumulation_dtype, attention_heads, attention_heads_cached, rms_norm, rope_at, rope_tables,
    swiglu_hidden, Heads,
};
use super::moe::{
    layer_moe, pool_moe, pooled_balance_loss, ExpertCompute, RouterRule, RouterTotals,
    EXCLUDED_LOGIT,
};
use super::params::{Attention, Layer, LayerFfn, Mlp, Moe, Params, QkNorm};

/// A router as a layer's MoE block applies it
/// ([`route_with`](super::moe::route_with)).
pub struct LayerRouter {
    /// [E, D], in the compute dtype.
    pub weight: Tensor,
    /// Scores and renormalisation (softmax, always renormalised, for the
    /// shared block; softmax and `norm_topk_prob` per layer; the pool's
    /// `router_score` and `norm_topk_prob` for a pooled MoE).
    pub rule: RouterRule,
    /// [E]: 0 for experts the layer may choose, [`EXCLUDED_LOGIT`] for
    /// the others (a pooled MoE restricted to each layer's own experts).
    pub mask: Option<Tensor>,
}

/// Where the forward hands a traced value to an observer
/// ([`Transformer::hidden_observed`]): the residual stream, and the inputs
/// of a block's linear layers (what calibration-based pruning needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// RMSNorm(h) entering attention [B, S, D]: the input of q, k and v.
    AttentionInput,
    /// The heads' outputs [B, S, H * Hd]: the input of o.
    AttentionHeads,
    /// The residual stream h [B, S, D] after attention, entering the FFN
    /// half.
    FfnResidual,
    /// RMSNorm(h) entering a dense MLP [B, S, D]: the input of gate and up.
    MlpInput,
    /// silu(gate(x)) * up(x) [B, S, F]: the input of down.
    MlpHidden,
}

/// What [`Transformer::hidden_observed`] calls with (layer, site, value).
pub type Observer<'o> = dyn FnMut(i64, Site, &Tensor) -> Result<()> + 'o;

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
    /// Set when the program is partitioned over a mesh: the MoE blocks
    /// then run on each device's own tokens.
    per_device: Option<PerDeviceMoe>,
    /// A pooled MoE routed by its teachers ([`with_teacher_routing`](Self::with_teacher_routing)).
    teacher_routing: bool,
}

/// The MoE blocks in a manually partitioned region (JAX's shard_map):
/// each device routes, sorts and computes the experts of its own tokens,
/// with the whole weights, and balances its own load, as one replica per
/// device did. Left to the SPMD partitioner, the routing's sort and the
/// expert blocks' loop over all the batch's tokens would be computed
/// whole on every device (measured: the 2-device step 1.35x slower).
struct PerDeviceMoe {
    mesh: Mesh,
    /// Tokens [N, D]: split along N over every device.
    tokens: Sharding,
    /// One row per device, [G, ..] split along G: what leaves the region
    /// per device (balance losses, routing totals).
    rows: Sharding,
    /// The shared block's weights in the compute dtype, whole on each
    /// device, inside the region (entered once for every layer).
    shared: Option<Moe<Tensor>>,
}

impl PerDeviceMoe {
    /// MoE weights, whole on each device, inside the region.
    fn enter(&self, w: &Moe<Tensor>) -> Result<Moe<Tensor>> {
        let whole = |t: &Tensor| t.to_manual(&Sharding::replicated(&self.mesh, t.rank()));
        Ok(Moe {
            router: whole(&w.router)?,
            experts: Mlp {
                gate: whole(&w.experts.gate)?,
                up: whole(&w.experts.up)?,
                down: whole(&w.experts.down)?,
            },
        })
    }

    /// A per-device value [..] leaving the region as its row of [G, ..].
    fn leave_as_row(&self, t: &Tensor) -> Result<Tensor> {
        let mut dims = vec![1];
        dims.extend(t.dims());
        let rows = Sharding::split(&self.mesh, dims.len(), 0, &self.axes())?;
        t.reshape(&dims)?.from_manual(&rows)
    }

    fn axes(&self) -> Vec<&str> {
        self.mesh.axis_names().collect()
    }
}

/// What a layer's MoE block contributes to the balance loss.
enum Balance {
    /// The shared MoE: this application's Switch loss.
    Loss(Tensor),
    /// A per-layer MoE: its routing totals [G, E] (one row per device
    /// group; G = 1 unpartitioned), pooled over layers by
    /// [`pooled_balance_loss`].
    Totals(RouterTotals),
}

/// The loss of one batch, kept in parts.
pub struct Loss {
    /// Mean next-token cross-entropy over every position.
    pub ce: Tensor,
    /// The balance loss (0 for dense models): the shared MoE's mean over
    /// layers of its Switch loss; a per-layer MoE's transformers loss
    /// pooled over its MoE layers. Per device, averaged, under a mesh.
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
            teacher_routing: false,
        })
    }

    /// A pooled MoE routed by its teachers, as the per-layer model it came
    /// from: layer i's original router over the pool experts from layer i
    /// (softmax, `norm_topk_prob`), the global router unused. The forward
    /// of router distillation ([`distill_loss`](Self::distill_loss)).
    pub fn with_teacher_routing(mut self) -> Result<Self> {
        if self.cfg.ffn != FfnKind::PooledMoe {
            return Err(GraphError::Usage(format!(
                "teacher routing needs a pooled MoE (model.ffn = \"pooled_moe\"), not {:?}",
                self.cfg.ffn
            )));
        }
        if self.per_device.is_some() {
            return Err(GraphError::Usage(
                "router distillation on a mesh of several devices is not built yet: run it on one \
                 device (train.replicas = 1)"
                    .into(),
            ));
        }
        self.teacher_routing = true;
        Ok(self)
    }

    /// For a program partitioned over `mesh` whose batch is split over all
    /// its devices: runs the shared MoE per device ([`PerDeviceMoe`]); the
    /// balance loss is then the mean of the devices'. Nothing changes on
    /// one device.
    pub fn with_moe_per_device(mut self, mesh: &Mesh) -> Result<Self> {
        if !self.cfg.is_moe() || mesh.devices() == 1 {
            return Ok(self);
        }
        let axes: Vec<&str> = mesh.axis_names().collect();
        let mut region = PerDeviceMoe {
            mesh: mesh.clone(),
            tokens: Sharding::split(mesh, 2, 0, &axes)?,
            rows: Sharding::split(mesh, 1, 0, &axes)?,
            shared: None,
        };
        if let Some(moe) = &self.shared_moe {
            region.shared = Some(region.enter(moe)?);
        }
        self.per_device = Some(region);
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

    /// The router layer `i`'s FFN routes with [E, D], in the compute dtype,
    /// as its MoE block uses it: the shared one, the layer's own, or None
    /// for an MLP layer.
    pub fn layer_router(&self, i: i64) -> Result<Option<LayerRouter>> {
        Ok(match &self.layer_params(i)?.ffn {
            LayerFfn::Mlp(_) => None,
            LayerFfn::Shared | LayerFfn::Pooled { .. } => {
                let (router, rule, mask) = self.pool_routing(i)?;
                Some(LayerRouter {
                    weight: router,
                    rule,
                    mask,
                })
            }
            LayerFfn::Moe(m) => Some(LayerRouter {
                weight: self.p(&m.router)?,
                rule: RouterRule {
                    score: RouterScore::Softmax,
                    normalize: self.cfg.norm_topk_prob,
                },
                mask: None,
            }),
        })
    }

    /// How layer `i` routes over the shared block or the pool: the router
    /// [E, D] (compute dtype), its rule and mask. The shared block: its
    /// router, softmax, renormalised. The pool: the global router with
    /// `router_score` and `norm_topk_prob`, restricted to the experts from
    /// layer `i` under `pool_scope = "layer"`; with teacher routing, layer
    /// i's original router placed on the rows of its experts, softmax over
    /// them alone.
    fn pool_routing(&self, i: i64) -> Result<(Tensor, RouterRule, Option<Tensor>)> {
        let c = self.cfg;
        let global = self.shared_moe()?.router.clone();
        if c.ffn != FfnKind::PooledMoe {
            let rule = RouterRule {
                score: RouterScore::Softmax,
                normalize: true,
            };
            return Ok((global, rule, None));
        }
        let own_only = || -> Result<Tensor> {
            let values: Vec<f64> = c
                .pool_origin
                .iter()
                .map(|&[l, _]| if l == i { 0.0 } else { EXCLUDED_LOGIT })
                .collect();
            let g = self.params.norm.graph();
            g.constant(&values, TensorType::new(DType::F32, &[c.num_experts]))
        };
        if self.teacher_routing {
            // Row e: the teacher's row of e's original expert (any row for
            // experts of other layers, which the mask excludes).
            let rows: Vec<f64> = c
                .pool_origin
                .iter()
                .map(|&[l, x]| if l == i { x as f64 } else { 0.0 })
                .collect();
            let g = self.params.norm.graph();
            let rows = g.constant(&rows, TensorType::new(DType::I32, &[c.num_experts]))?;
            let router = self.p(self.teacher(i)?)?.take(&rows)?;
            let rule = RouterRule {
                score: RouterScore::Softmax,
                normalize: c.norm_topk_prob,
            };
            return Ok((router, rule, Some(own_only()?)));
        }
        let rule = RouterRule {
            score: c.router_score,
            normalize: c.norm_topk_prob,
        };
        let mask = match c.pool_scope {
            PoolScope::Global => None,
            PoolScope::Layer => Some(own_only()?),
        };
        Ok((global, rule, mask))
    }

    /// Layer `i`'s original router of a pooled MoE [E_src, D] (f32).
    fn teacher(&self, i: i64) -> Result<&'a Tensor> {
        match &self.layer_params(i)?.ffn {
            LayerFfn::Pooled { teacher } => Ok(teacher),
            _ => Err(GraphError::Usage(format!(
                "layer {i} has no teacher router (not a pooled MoE layer)"
            ))),
        }
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
            qk_norm: match &a.qk_norm {
                Some(n) => Some(QkNorm {
                    q: self.p(&n.q)?,
                    k: self.p(&n.k)?,
                }),
                None => None,
            },
        })
    }

    /// The head layout attention runs with.
    fn heads(&self) -> Heads {
        Heads {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            norm_eps: self.cfg.rms_norm_eps,
        }
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
    /// for h [B, S, D], and what its MoE block adds to the balance loss
    /// (None for an MLP).
    fn ffn_block(
        &self,
        i: i64,
        h: &Tensor,
        observe: &mut Observer,
    ) -> Result<(Tensor, Option<Balance>)> {
        let c = self.cfg;
        let x = self.ffn_norm(i, h)?;
        let (b, s, d) = (x.dim(0)?, x.dim(1)?, c.hidden_size);
        let tokens = x.reshape(&[b * s, d])?;
        let k = c.experts_per_token;
        let (y, balance) = match &self.layer_params(i)?.ffn {
            LayerFfn::Mlp(m) => {
                observe(i, Site::MlpInput, &x)?;
                let hidden = swiglu_hidden(&x, &self.p(&m.gate)?, &self.p(&m.up)?)?;
                observe(i, Site::MlpHidden, &hidden)?;
                (hidden.linear(&self.p(&m.down)?)?, None)
            }
            LayerFfn::Shared | LayerFfn::Pooled { .. } => {
                let (router, rule, mask) = self.pool_routing(i)?;
                let mask = mask.as_ref();
                let (y, aux) = match &self.per_device {
                    None => {
                        let pool = self.shared_moe()?;
                        let w = Moe {
                            router,
                            experts: pool.experts.clone(),
                        };
                        pool_moe(&tokens, &w, k, rule, mask, self.experts)?
                    }
                    Some(p) => {
                        let local = tokens.to_manual(&p.tokens)?;
                        let weights = p.shared.as_ref().expect("entered with the shared block");
                        let (y, aux) = pool_moe(&local, weights, k, rule, mask, self.experts)?;
                        let losses = aux.reshape(&[1])?.from_manual(&p.rows)?;
                        (y.from_manual(&p.tokens)?, losses.mean(&[0])?)
                    }
                };
                (y.reshape(&[b, s, d])?, Some(Balance::Loss(aux)))
            }
            LayerFfn::Moe(m) => {
                let w = Moe {
                    router: self.p(&m.router)?,
                    experts: Mlp {
                        gate: self.p(&m.experts.gate)?,
                        up: self.p(&m.experts.up)?,
                        down: self.p(&m.experts.down)?,
                    },
                };
                let norm = c.norm_topk_prob;
                let (y, totals) = match &self.per_device {
                    None => {
                        let (y, t) = layer_moe(&tokens, &w, k, norm, self.experts)?;
                        let row = |v: &Tensor| v.reshape(&[1, c.num_experts]);
                        let totals = RouterTotals {
                            assignments: row(&t.assignments)?,
                            probs: row(&t.probs)?,
                        };
                        (y, totals)
                    }
                    Some(p) => {
                        let local = tokens.to_manual(&p.tokens)?;
                        let (y, t) = layer_moe(&local, &p.enter(&w)?, k, norm, self.experts)?;
                        let totals = RouterTotals {
                            assignments: p.leave_as_row(&t.assignments)?,
                            probs: p.leave_as_row(&t.probs)?,
                        };
                        (y.from_manual(&p.tokens)?, totals)
                    }
                };
                (y.reshape(&[b, s, d])?, Some(Balance::Totals(totals)))
            }
        };
        Ok((h.add(&y)?, balance))
    }

    /// The final RMSNorm.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        rms_norm(h, &self.p(&self.params.norm)?, self.cfg.rms_norm_eps)
    }

    /// Final hidden states [B, S, D] for input tokens [B, S], and the mean
    /// balance loss over layers.
    pub fn hidden(&self, inputs: &Tensor) -> Result<(Tensor, Tensor)> {
        self.hidden_observed(inputs, &mut |_, _, _| Ok(()))
    }

    /// [`hidden`](Self::hidden), calling `observe(i, site, value)` at each
    /// [`Site`] of layer `i` as it is traced; the traced forward is
    /// unchanged. For analyses such as `model::routing` and for pruning's
    /// calibration statistics.
    pub fn hidden_observed(
        &self,
        inputs: &Tensor,
        observe: &mut Observer,
    ) -> Result<(Tensor, Tensor)> {
        let c = self.cfg;
        let (b, s) = (inputs.dim(0)?, inputs.dim(1)?);
        let mut h = self.embed(inputs)?;
        let rope = rope_tables(&h, s, c.head_dim(), c.rope_theta)?;
        let acc = accumulation_dtype(self.compute);
        let mut aux_sum = inputs.graph().scalar(0.0, acc)?;
        let mut pooled: Option<RouterTotals> = None;
        let mut pooled_layers = 0;
        for i in 0..c.num_layers {
            let (next, balance, ()) = self.layer(
                i,
                &h,
                |x, w| Ok((attention_heads(x, w, self.heads(), &rope)?, ())),
                observe,
            )?;
            h = next;
            match balance {
                Some(Balance::Loss(aux)) => aux_sum = aux_sum.add(&aux)?,
                Some(Balance::Totals(t)) => {
                    pooled_layers += 1;
                    pooled = Some(match pooled {
                        None => t,
                        Some(sum) => RouterTotals {
                            assignments: sum.assignments.add(&t.assignments)?,
                            probs: sum.probs.add(&t.probs)?,
                        },
                    });
                }
                None => {}
            }
        }
        let h = self.final_norm(&h)?;
        let aux = match pooled {
            // Per device group (rows), over its tokens in every MoE layer.
            Some(t) => {
                let groups = t.probs.dim(0)?;
                let tokens = pooled_layers * (b * s / groups);
                pooled_balance_loss(&t, tokens)?.mean(&[0])?
            }
            None => aux_sum.mul_scalar(1.0 / c.num_layers as f64)?,
        };
        Ok((h, aux))
    }

    /// Layer `i` on the residual stream h [B, S, D]: h + o(attend(RMSNorm(h),
    /// weights)), then the FFN half, calling `observe` at each [`Site`].
    /// `attend` is full attention (training) or one cached position
    /// (decoding), up to the heads' outputs; what else it returns (the
    /// updated caches) is passed through. Returns the new h, the layer's
    /// balance loss (None for a dense model) and that value.
    fn layer<T>(
        &self,
        i: i64,
        h: &Tensor,
        attend: impl FnOnce(&Tensor, &Attention<Tensor>) -> Result<(Tensor, T)>,
        observe: &mut Observer,
    ) -> Result<(Tensor, Option<Balance>, T)> {
        let weights = self.attention_params(i)?;
        let x = self.attention_norm(i, h)?;
        observe(i, Site::AttentionInput, &x)?;
        let (heads, extra) = attend(&x, &weights)?;
        observe(i, Site::AttentionHeads, &heads)?;
        let h = h.add(&heads.linear(&weights.o)?)?;
        observe(i, Site::FfnResidual, &h)?;
        let (h, aux) = self.ffn_block(i, &h, observe)?;
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
                let (a, ck, cv) = attention_heads_cached(x, w, self.heads(), &rope, pos, (ck, cv))?;
                Ok((a, (ck, cv)))
            };
            let (next, _, cache) = self.layer(i, &h, attend, &mut |_, _, _| Ok(()))?;
            h = next;
            out.push(cache);
        }
        Ok((self.final_norm(&h)?, out))
    }

    /// Logits [B, S, V] in f32 (f64 for f64 models) through the untied
    /// head where the model has one, else the tied (possibly factorised)
    /// embedding.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let acc = accumulation_dtype(self.compute);
        let e = &self.params.embed;
        let (table, h) = match (&self.params.lm_head, &e.proj) {
            (Some(head), _) => (self.p(head)?, h.clone()),
            (None, Some(proj)) => (self.p(&e.table)?, h.matmul(&self.p(proj)?)?),
            (None, None) => (self.p(&e.table)?, h.clone()),
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
        let s = windows.dim(1)? - 1;
        let (h, aux) = self.hidden(&windows.slice_axis(1, 0, s)?)?;
        let ce = self.cross_entropy(&h, windows)?;
        let total = if self.cfg.is_moe() {
            ce.add(&aux.mul_scalar(self.cfg.aux_loss_coef)?)?
        } else {
            ce.clone()
        };
        Ok(Loss { ce, aux, total })
    }

    /// Mean next-token cross-entropy of final hidden states h [B, S, D]
    /// against windows [B, S+1] (targets window[:, 1:]).
    fn cross_entropy(&self, h: &Tensor, windows: &Tensor) -> Result<Tensor> {
        let (b, s1) = (windows.dim(0)?, windows.dim(1)?);
        let s = s1 - 1;
        let targets = windows.slice_axis(1, 1, s1)?;
        let v = self.cfg.vocab_size;
        let logits = self.logits(h)?.reshape(&[b * s, v])?;
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
        lse.sub(&picked)?.mean_all()
    }

    /// The router-distillation objective (`train.objective =
    /// "router_distill"`, [`super::distill`]) on windows [B, S+1], over
    /// the teacher-routed forward ([`with_teacher_routing`](Self::with_teacher_routing)):
    /// at every pooled layer i, the Bernoulli KL between layer i's
    /// original router and the global router's rows of the pool experts
    /// from layer i, on the layer's router input. Returns ce (of that
    /// forward: the original model's), aux = total = the summed KL.
    pub fn distill_loss(&self, windows: &Tensor) -> Result<Loss> {
        if !self.teacher_routing {
            return Err(GraphError::Usage(
                "distill_loss runs the teacher-routed forward: call with_teacher_routing first"
                    .into(),
            ));
        }
        let c = self.cfg;
        let (b, s) = (windows.dim(0)?, windows.dim(1)? - 1);
        let g = windows.graph();
        let global = &self.shared_moe()?.router;
        let mut total = g.scalar(0.0, accumulation_dtype(self.compute))?;
        let (h, _) = self.hidden_observed(&windows.slice_axis(1, 0, s)?, &mut |i, site, h| {
            if site != Site::FfnResidual {
                return Ok(());
            }
            if !matches!(self.layer_params(i)?.ffn, LayerFfn::Pooled { .. }) {
                return Ok(());
            }
            // The pool experts from layer i, and their original indices.
            let (pool_rows, source_rows): (Vec<f64>, Vec<f64>) = c
                .pool_origin
                .iter()
                .enumerate()
                .filter(|(_, o)| o[0] == i)
                .map(|(j, o)| (j as f64, o[1] as f64))
                .unzip();
            if pool_rows.is_empty() {
                return Ok(()); // every expert of the layer pruned
            }
            let rows = |v: &[f64]| g.constant(v, TensorType::new(DType::I32, &[v.len() as i64]));
            let x = self.ffn_norm(i, h)?.reshape(&[b * s, c.hidden_size])?;
            let teacher = self.p(self.teacher(i)?)?.take(&rows(&source_rows)?)?;
            let student = global.take(&rows(&pool_rows)?)?;
            total = total.add(&distill_term(&x, &teacher, &student)?)?;
            Ok(())
        })?;
        let ce = self.cross_entropy(&h, windows)?;
        Ok(Loss {
            ce,
            aux: total.clone(),
            total,
        })
    }
}
