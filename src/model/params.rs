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

/// Parameter count by component, then the total.
pub fn count_breakdown(c: &ModelConfig) -> Vec<(&'static str, i64)> {
    let mut parts: Vec<(&'static str, i64)> = vec![
        ("embedding", 0),
        ("attention", 0),
        ("norms", 0),
        ("mlp", 0),
        ("router", 0),
        ("experts", 0),
    ];
    for s in param_specs(c) {
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
        parts[part].1 += s.num_elements();
    }
    parts.retain(|(_, n)| *n > 0);
    let total = parts.iter().map(|(_, n)| n).sum();
    parts.push(("total", total));
    parts
}

pub fn count_params(c: &ModelConfig) -> i64 {
    param_specs(c).iter().map(ParamSpec::num_elements).sum()
}

/// Parameters a token actually uses in a forward pass (the routed experts
/// only, for the MoE): the N of the usual 6N FLOPs-per-token estimate,
/// excluding the embedding lookup but including the tied output
/// projection.
pub fn active_params_per_token(c: &ModelConfig) -> i64 {
    let mut n = 0;
    for s in param_specs(c) {
        n += if s.name.contains("shared_moe.experts") {
            s.num_elements() / c.num_experts * c.experts_per_token * c.num_layers
        } else if s.name.contains("router") {
            s.num_elements() * c.num_layers
        } else {
            s.num_elements()
        };
    }
    n
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
