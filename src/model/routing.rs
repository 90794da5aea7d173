//! Which experts the routers pick at each layer (the ONE shared router of
//! a shared-MoE model, or each MoE layer's own): a compiled analysis
//! program over the same forward as training
//! ([`Transformer::hidden_observed`]), and host-side statistics over its
//! choices (use per layer and expert, routing mass, and, for a shared
//! pool, how much the expert sets of two layers overlap for the same
//! token).
//!
//! The program only reads the model; it never changes the training forward
//! or the routers ([`route_with`] is the very function the MoE blocks use,
//! with [`Transformer::layer_router`]'s weights, rule and mask).
//!
//! Shapes: L layers, E experts, k experts per token, M rows of S tokens,
//! N = M * S tokens, D hidden.

use crate::graph::{DType, Function, Graph, GraphError, HostTensor, Result, Tensor, TensorType};

use super::config::{FfnKind, ModelConfig};
use super::moe::route_with;
use super::params::{declare_params, Params};
use super::transformer::{Site, Transformer};

/// One layer's routing of N tokens, traced.
pub struct LayerRouting {
    /// The model layer (0-based).
    pub layer: i64,
    /// The router's input x [N, D] (the layer's pre-FFN RMSNorm output).
    pub input: Tensor,
    /// p = softmax(W_r x) [N, E] (accumulation dtype).
    pub probs: Tensor,
    /// The top-k experts [N, k] (i32), most probable first.
    pub experts: Tensor,
    /// Their weights [N, k]: the probabilities, renormalised to sum to 1
    /// where the layer's block does so.
    pub weights: Tensor,
}

/// The layers [`trace_routing`] traces: every layer of a shared-MoE
/// model, the MoE layers of a per-layer or pooled one, none of a dense
/// one.
pub fn routed_layers(cfg: &ModelConfig) -> Vec<i64> {
    match cfg.ffn {
        FfnKind::Dense => vec![],
        FfnKind::SharedMoe => (0..cfg.num_layers).collect(),
        FfnKind::Moe | FfnKind::PooledMoe => cfg.expert_layers(),
    }
}

/// Traces the model on tokens [M, S] and returns, for every layer with a
/// router ([`routed_layers`]), what it saw and chose. Refuses a model
/// without routers.
pub fn trace_routing(
    cfg: &ModelConfig,
    params: &Params<Tensor>,
    compute: DType,
    inputs: &Tensor,
) -> Result<Vec<LayerRouting>> {
    if routed_layers(cfg).is_empty() {
        return Err(GraphError::Usage(
            "routing analysis needs an MoE model; this one has no routers".into(),
        ));
    }
    let model = Transformer::new(cfg, params, compute)?;
    let (b, s, d) = (inputs.dim(0)?, inputs.dim(1)?, cfg.hidden_size);
    let mut layers = Vec::with_capacity(cfg.num_layers as usize);
    model.hidden_observed(inputs, &mut |i, site, h| {
        if site != Site::FfnResidual {
            return Ok(());
        }
        let Some(router) = model.layer_router(i)? else {
            return Ok(());
        };
        let x = model.ffn_norm(i, h)?.reshape(&[b * s, d])?;
        let k = cfg.experts_per_token;
        let r = route_with(&x, &router.weight, k, router.rule, router.mask.as_ref())?;
        layers.push(LayerRouting {
            layer: i,
            input: x,
            probs: r.probs,
            experts: r.experts,
            weights: r.weights,
        });
        Ok(())
    })?;
    Ok(layers)
}

/// A program over the traced routing, named `name`: parameters (f32, in
/// [`param_specs`](super::params::param_specs) order, named as there) and
/// `windows` [M, S+1] (i32; the tokens are window[:, :S], as in the loss)
/// -> for each [`routed_layers`] layer in order, what `per_layer(layer,
/// params)` returns.
pub fn trace_program(
    cfg: &ModelConfig,
    compute: DType,
    (rows, seq_len): (i64, i64),
    name: &str,
    mut per_layer: impl FnMut(LayerRouting, &Params<Tensor>) -> Result<Vec<Tensor>>,
) -> Result<Function> {
    let g = Graph::new();
    let named = declare_params(&g, cfg)?;
    let windows = g.param("windows", TensorType::new(DType::I32, &[rows, seq_len + 1]))?;
    let inputs = windows.slice_axis(1, 0, seq_len)?;
    let mut outs = vec![];
    for l in trace_routing(cfg, &named, compute, &inputs)? {
        outs.extend(per_layer(l, &named)?);
    }
    let refs: Vec<&Tensor> = outs.iter().collect();
    Ok(g.build(&refs)?.with_name(name))
}

/// The routing program ([`trace_program`]): per layer probs [N, E]
/// (f32), experts [N, k] (i32), weights [N, k] (f32), and with
/// `with_inputs` also the router's input [N, D] (f32). See
/// [`outputs_per_layer`].
pub fn routing_program(
    cfg: &ModelConfig,
    compute: DType,
    rows: i64,
    seq_len: i64,
    with_inputs: bool,
) -> Result<Function> {
    trace_program(cfg, compute, (rows, seq_len), "routing", |l, _| {
        let mut outs = vec![
            l.probs.convert(DType::F32)?,
            l.experts,
            l.weights.convert(DType::F32)?,
        ];
        if with_inputs {
            outs.push(l.input.convert(DType::F32)?);
        }
        Ok(outs)
    })
}

/// How many results [`routing_program`] returns per layer.
pub fn outputs_per_layer(with_inputs: bool) -> usize {
    if with_inputs {
        4
    } else {
        3
    }
}

/// One layer's choices for N tokens, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerChoices {
    /// Chosen experts, token-major [N * k].
    pub experts: Vec<usize>,
    /// Their renormalised weights [N * k].
    pub weights: Vec<f64>,
}

/// The per-layer choices in [`routing_program`]'s results.
pub fn choices_from_outputs(outs: &[HostTensor], with_inputs: bool) -> Vec<LayerChoices> {
    outs.chunks(outputs_per_layer(with_inputs))
        .map(|l| LayerChoices {
            experts: l[1].to_f64().into_iter().map(|e| e as usize).collect(),
            weights: l[2].to_f64(),
        })
        .collect()
}

/// Whose experts a routing analysis counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertPool {
    /// One block shared by every layer (Experiment 1): expert e is the
    /// same weights at every layer, so the layers' choices can overlap.
    Shared,
    /// Each MoE layer has its own experts (Qwen3-MoE): expert e of one
    /// layer and e of another are unrelated; no overlap is counted.
    PerLayer,
}

/// Routing statistics accumulated over batches of tokens, for the traced
/// layers `layer_ids` (every layer of a shared-MoE model, the MoE layers
/// of a per-layer one); rows `l` below index that list.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingStats {
    pub pool: ExpertPool,
    /// The model layer of each traced row (0-based, increasing).
    pub layer_ids: Vec<usize>,
    /// Rows: `layer_ids.len()`.
    pub layers: usize,
    pub experts: usize,
    pub k: usize,
    /// Tokens seen (each goes through every layer).
    pub tokens: u64,
    /// [l][e]: tokens whose top-k at layer l holds e.
    pub counts: Vec<Vec<u64>>,
    /// [l][e]: sum over tokens of e's routing weight (0 if not chosen).
    mass: Vec<Vec<f64>>,
    /// Shared pools only.
    overlap: Option<LayerOverlap>,
}

/// How much the top-k sets of two layers overlap for the same token, and
/// for two different tokens (a shared pool's layers only).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerOverlap {
    /// Tokens counted.
    tokens: u64,
    /// [a][b]: tokens whose top-k sets at layers a and b intersect.
    shared: Vec<Vec<u64>>,
    /// [a][b]: sum over tokens of |A ∩ B| / |A ∪ B|.
    jaccard: Vec<Vec<f64>>,
    /// [a][b]: as `shared` between token t at a and its partner token at b.
    shared_other: Vec<Vec<u64>>,
    /// Token pairs behind `shared_other`.
    pairs: u64,
}

impl RoutingStats {
    /// Statistics of a shared pool used by `layers` layers.
    pub fn new(layers: usize, experts: usize, k: usize) -> RoutingStats {
        RoutingStats::shared_at((0..layers).collect(), experts, k)
    }

    /// Statistics of a shared pool used by the model layers `layer_ids`
    /// (a pooled MoE's MoE layers).
    pub fn shared_at(layer_ids: Vec<usize>, experts: usize, k: usize) -> RoutingStats {
        let layers = layer_ids.len();
        let m = |n| vec![vec![0; n]; layers];
        let mut s = RoutingStats::per_layer(layer_ids, experts, k);
        s.pool = ExpertPool::Shared;
        s.overlap = Some(LayerOverlap {
            tokens: 0,
            shared: m(layers),
            jaccard: vec![vec![0.0; layers]; layers],
            shared_other: m(layers),
            pairs: 0,
        });
        s
    }

    /// Statistics of per-layer experts at the model layers `layer_ids`.
    pub fn per_layer(layer_ids: Vec<usize>, experts: usize, k: usize) -> RoutingStats {
        let layers = layer_ids.len();
        RoutingStats {
            pool: ExpertPool::PerLayer,
            layer_ids,
            layers,
            experts,
            k,
            tokens: 0,
            counts: vec![vec![0; experts]; layers],
            mass: vec![vec![0.0; experts]; layers],
            overlap: None,
        }
    }

    /// Adds one batch: `layers[l]` holds every token's choices at traced
    /// layer l, the same tokens in the same order at every layer. Refuses
    /// a wrong number of layers or choices, an expert out of range or
    /// chosen twice by one token. The partner of token t (for the
    /// different-token baseline) is token (t + N/2) mod N of the same batch.
    pub fn add(&mut self, layers: &[LayerChoices]) -> std::result::Result<(), String> {
        let (big_l, e, k) = (self.layers, self.experts, self.k);
        if layers.len() != big_l {
            return Err(format!(
                "choices for {} layers, expected {big_l}",
                layers.len()
            ));
        }
        let n = layers.first().map_or(0, |c| c.experts.len() / k.max(1));
        for (l, c) in layers.iter().enumerate() {
            if c.experts.len() != n * k || c.weights.len() != n * k {
                return Err(format!(
                    "layer {l}: {} experts and {} weights, expected {} ({n} tokens x k = {k})",
                    c.experts.len(),
                    c.weights.len(),
                    n * k
                ));
            }
            for (t, set) in c.experts.chunks(k).enumerate() {
                for (j, &x) in set.iter().enumerate() {
                    if x >= e {
                        return Err(format!("layer {l}, token {t}: expert {x} of {e}"));
                    }
                    if set[..j].contains(&x) {
                        return Err(format!("layer {l}, token {t}: expert {x} chosen twice"));
                    }
                }
            }
        }
        for (l, c) in layers.iter().enumerate() {
            for (&x, &w) in c.experts.iter().zip(&c.weights) {
                self.counts[l][x] += 1;
                self.mass[l][x] += w;
            }
        }
        if let Some(o) = &mut self.overlap {
            o.add(layers, n, k);
        }
        self.tokens += n as u64;
        Ok(())
    }

    fn per_token(&self, sum: f64) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            sum / self.tokens as f64
        }
    }

    /// Share of the tokens that chose expert e at layer l (a layer's
    /// fractions sum to k).
    pub fn fraction(&self, l: usize, e: usize) -> f64 {
        self.per_token(self.counts[l][e] as f64)
    }

    /// Mean over tokens of e's routing weight at layer l (a layer's masses
    /// sum to 1 when the router renormalises its top-k, as the shared
    /// block and `norm_topk_prob` do; else to the mean top-k probability).
    pub fn mass(&self, l: usize, e: usize) -> f64 {
        self.per_token(self.mass[l][e])
    }

    /// [`mass`](Self::mass) averaged over layers: meaningful for a shared
    /// pool, where e is the same expert at every layer.
    pub fn overall_mass(&self, e: usize) -> f64 {
        (0..self.layers).map(|l| self.mass(l, e)).sum::<f64>() / self.layers.max(1) as f64
    }

    /// The overlap statistics between layers (None for per-layer experts).
    pub fn layer_overlap(&self) -> Option<&LayerOverlap> {
        self.overlap.as_ref()
    }

    /// Share of layer l's routing choices (N tokens x k) that went to e;
    /// a layer's shares sum to 1, uniform routing gives 1/E each.
    pub fn choice_share(&self, l: usize, e: usize) -> f64 {
        self.fraction(l, e) / self.k.max(1) as f64
    }

    /// Experts that receive at least `min_share` of layer l's routing
    /// choices.
    pub fn experts_used(&self, l: usize, min_share: f64) -> usize {
        (0..self.experts)
            .filter(|&e| self.choice_share(l, e) >= min_share)
            .count()
    }

    /// The effective number of experts at layer l: exp of the entropy of
    /// its choice shares (E for uniform routing, 1 if all choices went to
    /// one expert; needs no threshold).
    pub fn effective_experts(&self, l: usize) -> f64 {
        let entropy: f64 = (0..self.experts)
            .map(|e| self.choice_share(l, e))
            .filter(|&p| p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        entropy.exp()
    }

    /// Experts of layer l by decreasing count (ties: lower index first).
    pub fn ranked(&self, l: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.experts).collect();
        order.sort_by_key(|&e| std::cmp::Reverse(self.counts[l][e]));
        order
    }
}

impl LayerOverlap {
    /// Adds n tokens' top-k sets at every layer (already validated).
    fn add(&mut self, layers: &[LayerChoices], n: usize, k: usize) {
        let big_l = layers.len();
        let set = |l: usize, t: usize| &layers[l].experts[t * k..(t + 1) * k];
        for t in 0..n {
            let partner = (t + n / 2) % n;
            for a in 0..big_l {
                for b in 0..big_l {
                    if b >= a {
                        let common = intersection(set(a, t), set(b, t));
                        self.shared[a][b] += u64::from(common > 0);
                        self.jaccard[a][b] += common as f64 / (2 * k - common) as f64;
                    }
                    if n > 1 {
                        let common = intersection(set(a, t), set(b, partner));
                        self.shared_other[a][b] += u64::from(common > 0);
                    }
                }
            }
        }
        for a in 0..big_l {
            for b in 0..a {
                self.shared[a][b] = self.shared[b][a];
                self.jaccard[a][b] = self.jaccard[b][a];
            }
        }
        self.tokens += n as u64;
        if n > 1 {
            self.pairs += n as u64;
        }
    }

    fn per_token(&self, sum: f64) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            sum / self.tokens as f64
        }
    }

    /// Layers compared.
    pub fn layers(&self) -> usize {
        self.shared.len()
    }

    /// Share of tokens whose top-k sets at layers a and b share an expert.
    pub fn overlap(&self, a: usize, b: usize) -> f64 {
        self.per_token(self.shared[a][b] as f64)
    }

    /// Mean over tokens of the Jaccard index of the top-k sets at a and b.
    pub fn jaccard(&self, a: usize, b: usize) -> f64 {
        self.per_token(self.jaccard[a][b])
    }

    /// [`overlap`](Self::overlap) between a token at layer a and ANOTHER
    /// token at layer b: what the layers' expert usage alone gives.
    pub fn overlap_other_token(&self, a: usize, b: usize) -> f64 {
        if self.pairs == 0 {
            0.0
        } else {
            self.shared_other[a][b] as f64 / self.pairs as f64
        }
    }

    /// [`overlap`](Self::overlap), [`jaccard`](Self::jaccard) and
    /// [`overlap_other_token`](Self::overlap_other_token) averaged over
    /// every ordered pair of two different layers; None with one layer.
    pub fn between_layers(&self) -> Option<LayerAgreement> {
        let big_l = self.layers();
        if big_l < 2 {
            return None;
        }
        let mut mean = LayerAgreement::default();
        for a in 0..big_l {
            for b in (0..big_l).filter(|&b| b != a) {
                mean.overlap += self.overlap(a, b);
                mean.jaccard += self.jaccard(a, b);
                mean.other_token += self.overlap_other_token(a, b);
            }
        }
        let n = (big_l * (big_l - 1)) as f64;
        mean.overlap /= n;
        mean.jaccard /= n;
        mean.other_token /= n;
        Some(mean)
    }
}

/// How alike the expert choices of two layers are, averaged over pairs of
/// layers (see [`RoutingStats::between_layers`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LayerAgreement {
    /// Share of tokens whose top-k sets at the two layers intersect.
    pub overlap: f64,
    /// Mean Jaccard index of those sets.
    pub jaccard: f64,
    /// The overlap between a token and another token: what the layers'
    /// expert usage alone gives.
    pub other_token: f64,
}

/// Size of the intersection of two sets of distinct experts.
fn intersection(a: &[usize], b: &[usize]) -> usize {
    a.iter().filter(|x| b.contains(x)).count()
}

/// The chance that two independent uniformly random k-sets of E experts
/// intersect: 1 - C(E-k, k) / C(E, k).
pub fn uniform_overlap(experts: usize, k: usize) -> f64 {
    if 2 * k > experts {
        return 1.0;
    }
    let disjoint: f64 = (0..k)
        .map(|i| (experts - k - i) as f64 / (experts - i) as f64)
        .product();
    1.0 - disjoint
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_used_and_effective_count() {
        // 4 experts, top-2, one layer; 4 tokens: 3 x {0, 1}, 1 x {0, 2}.
        let mut s = RoutingStats::new(1, 4, 2);
        s.add(&[LayerChoices {
            experts: vec![0, 1, 0, 1, 0, 1, 0, 2],
            weights: vec![0.5; 8],
        }])
        .unwrap();
        // Shares of the 8 choices: 4/8, 3/8, 1/8, 0.
        let shares = [0.5, 0.375, 0.125, 0.0];
        for (e, want) in shares.iter().enumerate() {
            assert!((s.choice_share(0, e) - want).abs() < 1e-12);
        }
        assert_eq!(s.experts_used(0, 0.125), 3);
        assert_eq!(s.experts_used(0, 0.2), 2);
        let h: f64 = shares
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        assert!((s.effective_experts(0) - h.exp()).abs() < 1e-12);
        // Uniform routing: every expert counts fully.
        let mut u = RoutingStats::new(1, 4, 2);
        u.add(&[LayerChoices {
            experts: vec![0, 1, 2, 3],
            weights: vec![0.5; 4],
        }])
        .unwrap();
        assert!((u.effective_experts(0) - 4.0).abs() < 1e-12);
    }

    #[test]
    fn uniform_overlap_of_two_of_sixteen() {
        // C(14, 2) / C(16, 2) = 91 / 120 disjoint.
        assert!((uniform_overlap(16, 2) - 29.0 / 120.0).abs() < 1e-12);
        assert_eq!(uniform_overlap(4, 1), 0.25);
        assert_eq!(uniform_overlap(3, 2), 1.0);
    }
}
