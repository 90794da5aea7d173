//! The model's parameters: names and shapes per SPEC.md (HF LLaMA naming,
//! Linear weights [out, in]), initialisation, and the exact count.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use super::config::{FfnKind, ModelConfig};
use crate::graph::{DType, Graph, Tensor, TensorType};

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f64 },
    Ones,
}

/// One named parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub dims: Vec<i64>,
    pub init: Init,
}

impl ParamSpec {
    fn matrix(name: String, dims: &[i64]) -> ParamSpec {
        ParamSpec {
            name,
            dims: dims.to_vec(),
            init: Init::Normal { std: 0.02 },
        }
    }

    fn gain(name: String, d: i64) -> ParamSpec {
        ParamSpec {
            name,
            dims: vec![d],
            init: Init::Ones,
        }
    }

    pub fn num_elements(&self) -> i64 {
        self.dims.iter().product()
    }

    /// AdamW decays tensors of rank >= 2 only (not norm gains).
    pub fn decays(&self) -> bool {
        self.dims.len() >= 2
    }

    /// This parameter as an f32 input of `g`, named `prefix` + its name.
    pub fn declare(&self, g: &Graph, prefix: &str) -> crate::graph::Result<Tensor> {
        g.param(
            &format!("{prefix}{}", self.name),
            TensorType::new(DType::F32, &self.dims),
        )
    }
}

/// Every parameter of the model as an f32 input of `g`, with its name (what
/// [`Transformer::new`](super::Transformer::new) takes).
pub fn declare_params(g: &Graph, c: &ModelConfig) -> crate::graph::Result<Vec<(String, Tensor)>> {
    param_specs(c)
        .into_iter()
        .map(|s| Ok((s.name.clone(), s.declare(g, "")?)))
        .collect()
}

/// Every parameter of the model, in checkpoint order.
pub fn param_specs(c: &ModelConfig) -> Vec<ParamSpec> {
    let (d, kv) = (c.hidden_size, c.kv_dim());
    let mut v = vec![];
    if c.embedding_dim > 0 {
        v.push(ParamSpec::matrix(
            "model.embed_tokens.weight".into(),
            &[c.vocab_size, c.embedding_dim],
        ));
        // 1/sqrt(e) so that U P^T has the 0.02 scale of a dense table.
        let std = 1.0 / (c.embedding_dim as f64).sqrt();
        v.push(ParamSpec {
            name: "model.embed_proj.weight".into(),
            dims: vec![d, c.embedding_dim],
            init: Init::Normal { std },
        });
    } else {
        v.push(ParamSpec::matrix(
            "model.embed_tokens.weight".into(),
            &[c.vocab_size, d],
        ));
    }
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        v.push(ParamSpec::gain(format!("{p}.input_layernorm.weight"), d));
        v.push(ParamSpec::matrix(
            format!("{p}.self_attn.q_proj.weight"),
            &[d, d],
        ));
        v.push(ParamSpec::matrix(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv, d],
        ));
        v.push(ParamSpec::matrix(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv, d],
        ));
        v.push(ParamSpec::matrix(
            format!("{p}.self_attn.o_proj.weight"),
            &[d, d],
        ));
        v.push(ParamSpec::gain(
            format!("{p}.post_attention_layernorm.weight"),
            d,
        ));
        if c.ffn == FfnKind::Dense {
            let f = c.intermediate_size;
            v.push(ParamSpec::matrix(
                format!("{p}.mlp.gate_proj.weight"),
                &[f, d],
            ));
            v.push(ParamSpec::matrix(
                format!("{p}.mlp.up_proj.weight"),
                &[f, d],
            ));
            v.push(ParamSpec::matrix(
                format!("{p}.mlp.down_proj.weight"),
                &[d, f],
            ));
        }
    }
    if c.ffn == FfnKind::SharedMoe {
        let (e, f) = (c.num_experts, c.expert_intermediate_size);
        v.push(ParamSpec::matrix(
            "model.shared_moe.router.weight".into(),
            &[e, d],
        ));
        v.push(ParamSpec::matrix(
            "model.shared_moe.experts.gate_proj".into(),
            &[e, f, d],
        ));
        v.push(ParamSpec::matrix(
            "model.shared_moe.experts.up_proj".into(),
            &[e, f, d],
        ));
        v.push(ParamSpec::matrix(
            "model.shared_moe.experts.down_proj".into(),
            &[e, d, f],
        ));
    }
    v.push(ParamSpec::gain("model.norm.weight".into(), d));
    v
}

/// Parameter counts of a model, computed from its shape (not by listing
/// every tensor, so an absurd `num_layers` costs nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    pub embedding: i64,
    pub attention: i64,
    pub norms: i64,
    pub mlp: i64,
    pub router: i64,
    pub experts: i64,
    pub total: i64,
    /// See [`active_params_per_token`].
    pub active_per_token: i64,
}

/// Bytes of training state per parameter: f32 parameters, gradients and
/// both Adam moments.
pub const TRAINING_BYTES_PER_PARAM: i64 = 16;

/// One factor of a count: the config field it comes from (for the error
/// message) and its value.
type Factor = (&'static str, i64);

/// The product of `factors`, or an error naming the fields when it
/// overflows i64.
fn product(what: &str, factors: &[Factor]) -> Result<i64, String> {
    factors
        .iter()
        .try_fold(1i64, |acc, &(_, v)| acc.checked_mul(v))
        .ok_or_else(|| overflow(what, factors))
}

fn overflow(what: &str, factors: &[Factor]) -> String {
    let fields: Vec<String> = factors
        .iter()
        .map(|(name, v)| format!("{name} = {v}"))
        .collect();
    format!(
        "{}: the {what} ({}) overflows a 64-bit count",
        fields.first().cloned().unwrap_or_default(),
        fields.join(" x ")
    )
}

fn sum(what: &str, parts: &[i64]) -> Result<i64, String> {
    parts
        .iter()
        .try_fold(0i64, |acc, &v| acc.checked_add(v))
        .ok_or_else(|| format!("the {what} overflows a 64-bit count (parts: {parts:?})"))
}

/// Every count of `c` with checked arithmetic: an error names the fields
/// whose product overflows i64, or says that the training state (16 bytes
/// per parameter) would not fit a 64-bit address space. Expects the
/// shape checks of [`ModelConfig::validate`] (positive sizes) to pass.
pub fn checked_counts(c: &ModelConfig) -> Result<Counts, String> {
    const V: &str = "model.vocab_size";
    const D: &str = "model.hidden_size";
    const E: &str = "model.embedding_dim";
    const L: &str = "model.num_layers";
    const F: &str = "model.intermediate_size";
    const X: &str = "model.num_experts";
    const XF: &str = "model.expert_intermediate_size";
    const K: &str = "model.experts_per_token";
    const KV: &str = "model.num_kv_heads * head_dim";
    let (v, d, l) = (c.vocab_size, c.hidden_size, c.num_layers);
    let kv = c.num_kv_heads.checked_mul(c.head_dim()).unwrap_or(i64::MAX);
    let embedding = if c.embedding_dim > 0 {
        let e = c.embedding_dim;
        sum(
            "embedding parameter count",
            &[
                product("embedding table", &[(V, v), (E, e)])?,
                product("embedding projection", &[(D, d), (E, e)])?,
            ],
        )?
    } else {
        product("embedding table", &[(V, v), (D, d)])?
    };
    let attention_layer = sum(
        "attention parameter count of a layer",
        &[
            product("q_proj weight", &[(D, d), (D, d)])?,
            product("k_proj weight", &[(KV, kv), (D, d)])?,
            product("v_proj weight", &[(KV, kv), (D, d)])?,
            product("o_proj weight", &[(D, d), (D, d)])?,
        ],
    )?;
    let attention = product(
        "attention parameter count",
        &[(L, l), ("attention per layer", attention_layer)],
    )?;
    let norms = sum(
        "norm parameter count",
        &[
            product(
                "layer norm gains",
                &[(L, l), (D, d), ("norms per layer", 2)],
            )?,
            d,
        ],
    )?;
    let (mut mlp, mut router, mut experts, mut active_moe) = (0, 0, 0, 0);
    match c.ffn {
        FfnKind::Dense => {
            let f = c.intermediate_size;
            mlp = product(
                "MLP parameter count",
                &[(L, l), (F, f), (D, d), ("weights per layer", 3)],
            )?;
        }
        FfnKind::SharedMoe => {
            let (x, f, k) = (
                c.num_experts,
                c.expert_intermediate_size,
                c.experts_per_token,
            );
            router = product("router weight", &[(X, x), (D, d)])?;
            experts = product(
                "expert parameter count",
                &[(X, x), (XF, f), (D, d), ("weights", 3)],
            )?;
            // Used per token: the router once per layer, k experts' three
            // weights once per layer.
            let routed = product(
                "routed expert weights used per token",
                &[(XF, f), (D, d), (K, k), (L, l), ("weights", 3)],
            )?;
            let routing = product("router weights used per token", &[(X, x), (D, d), (L, l)])?;
            active_moe = sum("parameters used per token", &[routed, routing])?;
        }
    }
    let total = sum(
        "parameter count",
        &[embedding, attention, norms, mlp, router, experts],
    )?;
    let active_per_token = sum(
        "parameters used per token",
        &[embedding, attention, norms, mlp, active_moe],
    )?;
    if total.checked_mul(TRAINING_BYTES_PER_PARAM).is_none() {
        return Err(format!(
            "model.hidden_size = {d}, model.num_layers = {l}, model.vocab_size = {v}: {total} parameters \
             need {TRAINING_BYTES_PER_PARAM} bytes each of training state, more than a 64-bit address space"
        ));
    }
    Ok(Counts {
        embedding,
        attention,
        norms,
        mlp,
        router,
        experts,
        total,
        active_per_token,
    })
}

fn counts(c: &ModelConfig) -> Counts {
    checked_counts(c).unwrap_or_else(|e| panic!("parameter count of an unvalidated model: {e}"))
}

/// Parameter count by component, then the total. (Panics on a model whose
/// count overflows, which [`ModelConfig::validate`] refuses.)
pub fn count_breakdown(c: &ModelConfig) -> Vec<(&'static str, i64)> {
    let n = counts(c);
    let mut parts = vec![
        ("embedding", n.embedding),
        ("attention", n.attention),
        ("norms", n.norms),
        ("mlp", n.mlp),
        ("router", n.router),
        ("experts", n.experts),
    ];
    parts.retain(|(_, n)| *n > 0);
    parts.push(("total", n.total));
    parts
}

pub fn count_params(c: &ModelConfig) -> i64 {
    counts(c).total
}

/// Parameters a token actually uses in a forward pass (the routed experts
/// only, for the MoE): the N of the usual 6N FLOPs-per-token estimate,
/// excluding the embedding lookup but including the tied output
/// projection.
pub fn active_params_per_token(c: &ModelConfig) -> i64 {
    counts(c).active_per_token
}

/// Deterministic initial values (f32, row-major) for every parameter.
/// Each tensor draws from its own stream keyed by (seed, name), so adding
/// or reordering tensors never changes the others.
pub fn init_params(c: &ModelConfig, seed: u64) -> Vec<(ParamSpec, Vec<f32>)> {
    param_specs(c)
        .into_iter()
        .map(|s| {
            let n = s.num_elements() as usize;
            let values = match s.init {
                Init::Ones => vec![1.0; n],
                Init::Normal { std } => {
                    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ fnv1a(&s.name));
                    let normal = Normal::new(0.0, std).expect("std is positive");
                    (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
                }
            };
            (s, values)
        })
        .collect()
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_counts_of_the_spec() {
        assert_eq!(count_params(&ModelConfig::dense125m()), 137_841_408);
        assert_eq!(count_params(&ModelConfig::sharedmoe50m()), 49_642_240);
        let b = count_breakdown(&ModelConfig::sharedmoe50m());
        assert_eq!(b.last().unwrap(), &("total", 49_642_240));
        assert!(b.contains(&("experts", 26_542_080)) && b.contains(&("router", 12_288)));
    }

    /// The counts from the shape equal those of the listed tensors.
    #[test]
    fn counts_match_the_tensor_list() {
        for name in crate::model::config::PRESET_NAMES {
            let c = ModelConfig::preset(name).unwrap();
            let specs = param_specs(&c);
            let listed: i64 = specs.iter().map(ParamSpec::num_elements).sum();
            assert_eq!(count_params(&c), listed, "{name}");
            let mut parts = [0i64; 6];
            let mut active = 0;
            for s in &specs {
                let part = if s.name.contains("embed") {
                    0
                } else if s.name.contains("self_attn") {
                    1
                } else if s.name.contains("norm") {
                    2
                } else if s.name.contains(".mlp.") {
                    3
                } else if s.name.contains("router") {
                    4
                } else {
                    5
                };
                parts[part] += s.num_elements();
                active += if s.name.contains("shared_moe.experts") {
                    s.num_elements() / c.num_experts * c.experts_per_token * c.num_layers
                } else if s.name.contains("router") {
                    s.num_elements() * c.num_layers
                } else {
                    s.num_elements()
                };
            }
            let n = checked_counts(&c).unwrap();
            assert_eq!(
                [
                    n.embedding,
                    n.attention,
                    n.norms,
                    n.mlp,
                    n.router,
                    n.experts
                ],
                parts,
                "{name}"
            );
            assert_eq!(n.active_per_token, active, "{name}");
        }
    }

    #[test]
    fn overflowing_counts_name_the_field() {
        let mut c = ModelConfig::preset("tiny-sharedmoe").unwrap();
        c.hidden_size = 1 << 40;
        let e = checked_counts(&c).unwrap_err();
        assert!(e.starts_with("model.hidden_size = 1099511627776"), "{e}");
        assert!(e.contains("overflows a 64-bit count"), "{e}");
        let mut c = ModelConfig::preset("tiny-dense").unwrap();
        c.num_layers = 1 << 50;
        let e = checked_counts(&c).unwrap_err();
        assert!(e.contains("model.num_layers = 1125899906842624"), "{e}");
    }

    #[test]
    fn names_follow_the_spec() {
        let names: Vec<String> = param_specs(&ModelConfig::sharedmoe50m())
            .into_iter()
            .map(|s| s.name)
            .collect();
        for want in [
            "model.embed_tokens.weight",
            "model.embed_proj.weight",
            "model.layers.11.self_attn.k_proj.weight",
            "model.shared_moe.experts.down_proj",
            "model.norm.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want}");
        }
        let k = param_specs(&ModelConfig::sharedmoe50m())
            .into_iter()
            .find(|s| s.name.ends_with("0.self_attn.k_proj.weight"));
        assert_eq!(k.unwrap().dims, vec![256, 768]);
    }

    #[test]
    fn init_is_deterministic_and_scaled() {
        let c = ModelConfig::preset("tiny-sharedmoe").unwrap();
        let a = init_params(&c, 7);
        assert_eq!(a, init_params(&c, 7));
        assert_ne!(a, init_params(&c, 8));
        let proj = a
            .iter()
            .find(|(s, _)| s.name == "model.embed_proj.weight")
            .unwrap();
        let std =
            (proj.1.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / proj.1.len() as f64).sqrt();
        assert!(
            (std - 0.25).abs() < 0.03,
            "embed_proj std {std} (want 1/sqrt(16))"
        );
        let gains = a
            .iter()
            .find(|(s, _)| s.name == "model.norm.weight")
            .unwrap();
        assert!(gains.1.iter().all(|&v| v == 1.0));
    }
}
