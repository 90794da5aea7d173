//! The model's parameters as ONE typed tree, [`Params`], generic over what
//! a leaf holds: a [`ParamSpec`] (name, shape, init, role), a traced
//! [`Tensor`], a device buffer or host values, as a JAX pytree.
//!
//! [`Params::spec`] is the only place tensor names are spelled: the
//! checkpoint contract of SPEC.md (HF LLaMA naming, Linear weights
//! [out, in]). Everything else maps over the tree, so a wrong field is a
//! compile error, and the flat order (checkpoints, program arguments) is
//! the one traversal in [`Params::try_map`]. Each leaf also carries its
//! [`Role`], what counts and sharding rules are written against.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use super::config::{FfnKind, ModelConfig};
use crate::graph::{DType, Graph, Tensor, TensorType};

/// What a parameter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The (tied) token table and the factorised embedding's projection.
    Embedding,
    /// q, k, v, o projections.
    Attention,
    /// RMSNorm gains.
    Norm,
    /// A dense SwiGLU MLP's weights.
    Mlp,
    /// A mixture-of-experts router [E, D].
    Router,
    /// Stacked expert weights [E, ..] (the leading axis is the expert).
    Experts,
}

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
    pub role: Role,
}

impl ParamSpec {
    fn matrix(role: Role, name: String, dims: &[i64]) -> ParamSpec {
        ParamSpec {
            name,
            dims: dims.to_vec(),
            init: Init::Normal { std: 0.02 },
            role,
        }
    }

    fn gain(name: String, d: i64) -> ParamSpec {
        ParamSpec {
            name,
            dims: vec![d],
            init: Init::Ones,
            role: Role::Norm,
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

/// Every parameter of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Params<T> {
    pub embed: Embedding<T>,
    pub layers: Vec<Layer<T>>,
    /// The one MoE block every layer shares (shared-MoE models only).
    pub shared_moe: Option<Moe<T>>,
    /// The final RMSNorm's gain.
    pub norm: T,
    /// The output projection [V, D] of a model with untied embeddings
    /// (None: the logits reuse the token embedding).
    pub lm_head: Option<T>,
}

/// The tied token embedding: a [V, D] table, or a factorised [V, e] table
/// with its [D, e] projection.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding<T> {
    pub table: T,
    pub proj: Option<T>,
}

/// One pre-norm block.
#[derive(Clone, Debug, PartialEq)]
pub struct Layer<T> {
    pub attn_norm: T,
    pub attn: Attention<T>,
    pub ffn_norm: T,
    pub ffn: LayerFfn<T>,
}

/// Attention projections, [out, in]: q [H*Hd, D], k and v [K*Hd, D],
/// o [D, H*Hd]; with qk-norm, the query and key heads' RMSNorm gains [Hd].
#[derive(Clone, Debug, PartialEq)]
pub struct Attention<T> {
    pub q: T,
    pub k: T,
    pub v: T,
    pub o: T,
    pub qk_norm: Option<QkNorm<T>>,
}

/// Qwen3's per-head RMSNorm gains on queries and keys [Hd].
#[derive(Clone, Debug, PartialEq)]
pub struct QkNorm<T> {
    pub q: T,
    pub k: T,
}

/// A layer's feed-forward half.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerFfn<T> {
    /// Its own SwiGLU MLP.
    Mlp(Mlp<T>),
    /// The model's shared MoE block ([`Params::shared_moe`]).
    Shared,
    /// Its own router and experts (per-layer MoE).
    Moe(Moe<T>),
    /// The pooled MoE's pool and global router ([`Params::shared_moe`],
    /// `model.pool.*`), and the layer's original router [E_src, D], kept
    /// as the distillation teacher (`model.layers.{l}.mlp.gate.weight`).
    Pooled { teacher: T },
}

/// SwiGLU weights: gate and up [F, D], down [D, F]; stacked over experts
/// with a leading E axis in a [`Moe`].
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp<T> {
    pub gate: T,
    pub up: T,
    pub down: T,
}

/// A mixture-of-experts block: the router [E, D] and E stacked experts.
#[derive(Clone, Debug, PartialEq)]
pub struct Moe<T> {
    pub router: T,
    pub experts: Mlp<T>,
}

impl Moe<ParamSpec> {
    /// A MoE block of `c`'s expert shape: the router [E, D] named
    /// `router`, the experts stacked along E as `{prefix}.experts.{proj}`
    /// (gate and up [E, F, D], down [E, D, F]).
    fn spec(c: &ModelConfig, prefix: &str, router: &str) -> Moe<ParamSpec> {
        let (d, e, f) = (c.hidden_size, c.num_experts, c.expert_intermediate_size);
        let expert = |n: &str, dims: &[i64]| {
            ParamSpec::matrix(Role::Experts, format!("{prefix}.experts.{n}"), dims)
        };
        Moe {
            router: ParamSpec::matrix(Role::Router, router.into(), &[e, d]),
            experts: Mlp {
                gate: expert("gate_proj", &[e, f, d]),
                up: expert("up_proj", &[e, f, d]),
                down: expert("down_proj", &[e, d, f]),
            },
        }
    }
}

impl Params<ParamSpec> {
    /// The parameters of `c`, named as in SPEC.md: the one place tensor
    /// names are written.
    pub fn spec(c: &ModelConfig) -> Params<ParamSpec> {
        let (d, q, kv, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.head_dim());
        let matrix = ParamSpec::matrix;
        // The table is [V, e] when factorised (with its [D, e] projection),
        // else [V, D].
        let factorised = c.embedding_dim > 0;
        let width = if factorised { c.embedding_dim } else { d };
        let embed = Embedding {
            table: matrix(
                Role::Embedding,
                "model.embed_tokens.weight".into(),
                &[c.vocab_size, width],
            ),
            // 1/sqrt(e) so that U P^T has the 0.02 scale of a dense table.
            proj: factorised.then(|| ParamSpec {
                init: Init::Normal {
                    std: 1.0 / (width as f64).sqrt(),
                },
                ..matrix(
                    Role::Embedding,
                    "model.embed_proj.weight".into(),
                    &[d, width],
                )
            }),
        };
        let layer = |i: i64| {
            let name = |n: &str| format!("model.layers.{i}.{n}");
            let attn = |n: &str, dims: &[i64]| {
                matrix(
                    Role::Attention,
                    name(&format!("self_attn.{n}.weight")),
                    dims,
                )
            };
            let dense_mlp = || {
                let f = c.intermediate_size;
                let mlp = |n: &str, dims: &[i64]| {
                    matrix(Role::Mlp, name(&format!("mlp.{n}.weight")), dims)
                };
                Mlp {
                    gate: mlp("gate_proj", &[f, d]),
                    up: mlp("up_proj", &[f, d]),
                    down: mlp("down_proj", &[d, f]),
                }
            };
            Layer {
                attn_norm: ParamSpec::gain(name("input_layernorm.weight"), d),
                attn: Attention {
                    q: attn("q_proj", &[q, d]),
                    k: attn("k_proj", &[kv, d]),
                    v: attn("v_proj", &[kv, d]),
                    o: attn("o_proj", &[d, q]),
                    qk_norm: c.qk_norm.then(|| QkNorm {
                        q: ParamSpec::gain(name("self_attn.q_norm.weight"), hd),
                        k: ParamSpec::gain(name("self_attn.k_norm.weight"), hd),
                    }),
                },
                ffn_norm: ParamSpec::gain(name("post_attention_layernorm.weight"), d),
                ffn: match c.ffn {
                    FfnKind::Moe if c.layer_has_experts(i) => {
                        let prefix = name("mlp");
                        LayerFfn::Moe(Moe::spec(c, &prefix, &format!("{prefix}.gate.weight")))
                    }
                    FfnKind::Dense | FfnKind::Moe => LayerFfn::Mlp(dense_mlp()),
                    FfnKind::SharedMoe => LayerFfn::Shared,
                    FfnKind::PooledMoe if c.layer_has_experts(i) => LayerFfn::Pooled {
                        teacher: matrix(
                            Role::Router,
                            name("mlp.gate.weight"),
                            &[c.pool_source_experts, d],
                        ),
                    },
                    FfnKind::PooledMoe => LayerFfn::Mlp(dense_mlp()),
                },
            }
        };
        let shared_moe = match c.ffn {
            FfnKind::SharedMoe => Some(Moe::spec(
                c,
                "model.shared_moe",
                "model.shared_moe.router.weight",
            )),
            FfnKind::PooledMoe => Some(Moe::spec(c, "model.pool", "model.pool.router.weight")),
            FfnKind::Dense | FfnKind::Moe => None,
        };
        Params {
            embed,
            layers: (0..c.num_layers).map(layer).collect(),
            shared_moe,
            norm: ParamSpec::gain("model.norm.weight".into(), d),
            lm_head: (!c.tie_word_embeddings)
                .then(|| matrix(Role::Embedding, "lm_head.weight".into(), &[c.vocab_size, d])),
        }
    }

    /// Every parameter as an f32 input of `g`, named `prefix` + its name.
    pub fn declare(&self, g: &Graph, prefix: &str) -> crate::graph::Result<Params<Tensor>> {
        self.try_map(|s| s.declare(g, prefix))
    }
}

impl<T> Params<T> {
    /// The same tree with every leaf replaced by `f(leaf)`, visiting leaves
    /// in checkpoint order (the order of [`leaves`](Self::leaves)): the
    /// embedding table and projection; per layer its input norm, q, k, v,
    /// o, the q and k norms, post-attention norm and MLP (gate, up, down)
    /// or MoE (router, experts' gate, up, down); the shared MoE's router
    /// and experts; the final norm; the untied head.
    pub fn try_map<'a, U, E>(
        &'a self,
        mut f: impl FnMut(&'a T) -> Result<U, E>,
    ) -> Result<Params<U>, E> {
        let embed = Embedding {
            table: f(&self.embed.table)?,
            proj: self.embed.proj.as_ref().map(&mut f).transpose()?,
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(Layer {
                attn_norm: f(&l.attn_norm)?,
                attn: Attention {
                    q: f(&l.attn.q)?,
                    k: f(&l.attn.k)?,
                    v: f(&l.attn.v)?,
                    o: f(&l.attn.o)?,
                    qk_norm: match &l.attn.qk_norm {
                        Some(n) => Some(QkNorm {
                            q: f(&n.q)?,
                            k: f(&n.k)?,
                        }),
                        None => None,
                    },
                },
                ffn_norm: f(&l.ffn_norm)?,
                ffn: match &l.ffn {
                    LayerFfn::Mlp(m) => LayerFfn::Mlp(m.try_map(&mut f)?),
                    LayerFfn::Shared => LayerFfn::Shared,
                    LayerFfn::Moe(m) => LayerFfn::Moe(m.try_map(&mut f)?),
                    LayerFfn::Pooled { teacher } => LayerFfn::Pooled {
                        teacher: f(teacher)?,
                    },
                },
            });
        }
        let shared_moe = match &self.shared_moe {
            Some(m) => Some(m.try_map(&mut f)?),
            None => None,
        };
        Ok(Params {
            embed,
            layers,
            shared_moe,
            norm: f(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(&mut f).transpose()?,
        })
    }

    /// [`try_map`](Self::try_map) with an infallible `f`.
    pub fn map<'a, U>(&'a self, mut f: impl FnMut(&'a T) -> U) -> Params<U> {
        match self.try_map(|t| Ok::<U, std::convert::Infallible>(f(t))) {
            Ok(p) => p,
            Err(never) => match never {},
        }
    }

    /// Every leaf, in checkpoint order.
    pub fn leaves(&self) -> Vec<&T> {
        let mut out = vec![];
        self.map(|t| out.push(t));
        out
    }

    /// The number of leaves (parameter tensors).
    pub fn num_tensors(&self) -> usize {
        self.leaves().len()
    }

    /// This tree's shape with the leaves taken from `values`, in checkpoint
    /// order; an error when their count differs.
    pub fn with_leaves<U>(&self, values: Vec<U>) -> crate::graph::Result<Params<U>> {
        let n = self.num_tensors();
        if values.len() != n {
            return Err(crate::graph::GraphError::Usage(format!(
                "{} values for a model of {n} parameter tensors",
                values.len()
            )));
        }
        let mut values = values.into_iter();
        Ok(self.map(|_| values.next().expect("as many values as leaves")))
    }
}

impl<T> Moe<T> {
    fn try_map<'a, U, E>(&'a self, f: &mut impl FnMut(&'a T) -> Result<U, E>) -> Result<Moe<U>, E> {
        Ok(Moe {
            router: f(&self.router)?,
            experts: self.experts.try_map(f)?,
        })
    }
}

impl<T> Mlp<T> {
    fn try_map<'a, U, E>(&'a self, f: &mut impl FnMut(&'a T) -> Result<U, E>) -> Result<Mlp<U>, E> {
        Ok(Mlp {
            gate: f(&self.gate)?,
            up: f(&self.up)?,
            down: f(&self.down)?,
        })
    }
}

/// Every parameter of the model, in checkpoint order.
pub fn param_specs(c: &ModelConfig) -> Vec<ParamSpec> {
    Params::spec(c).leaves().into_iter().cloned().collect()
}

/// Every parameter of the model as an f32 input of `g` (what
/// [`Transformer::new`](super::Transformer::new) takes).
pub fn declare_params(g: &Graph, c: &ModelConfig) -> crate::graph::Result<Params<Tensor>> {
    Params::spec(c).declare(g, "")
}

/// Deterministic initial values (f32, row-major) for every parameter.
/// Each tensor draws from its own stream keyed by (seed, name), so adding
/// or reordering tensors never changes the others.
pub fn init_params(c: &ModelConfig, seed: u64) -> Vec<(ParamSpec, Vec<f32>)> {
    param_specs(c)
        .into_iter()
        .map(|s| {
            let values = init_values(&s, seed);
            (s, values)
        })
        .collect()
}

/// The initial values of one parameter from the run's `seed` (each
/// tensor's stream depends on its name only, so one can be drawn alone).
pub fn init_values(s: &ParamSpec, seed: u64) -> Vec<f32> {
    let n = s.num_elements() as usize;
    match s.init {
        Init::Ones => vec![1.0; n],
        Init::Normal { std } => {
            let mut rng = ChaCha20Rng::seed_from_u64(seed ^ fnv1a(&s.name));
            let normal = Normal::new(0.0, std).expect("std is positive");
            (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
        }
    }
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

    /// The tree's flat order is the order checkpoints and programs were
    /// written in before the tree existed (pinned by name), and
    /// `with_leaves` rebuilds the same tree.
    #[test]
    fn flat_order_is_the_checkpoint_order() {
        let c = ModelConfig::preset("tiny-dense").unwrap();
        let names: Vec<String> = param_specs(&c).into_iter().map(|s| s.name).collect();
        let mut want = vec!["model.embed_tokens.weight".to_string()];
        for i in 0..c.num_layers {
            for n in [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                want.push(format!("model.layers.{i}.{n}"));
            }
        }
        want.push("model.norm.weight".into());
        assert_eq!(names, want);
        let c = ModelConfig::preset("tiny-sharedmoe").unwrap();
        let names: Vec<String> = param_specs(&c).into_iter().map(|s| s.name).collect();
        let tail = &names[names.len() - 5..];
        assert_eq!(
            tail,
            [
                "model.shared_moe.router.weight",
                "model.shared_moe.experts.gate_proj",
                "model.shared_moe.experts.up_proj",
                "model.shared_moe.experts.down_proj",
                "model.norm.weight"
            ]
        );
        assert_eq!(
            &names[..2],
            ["model.embed_tokens.weight", "model.embed_proj.weight"]
        );
        let tree = Params::spec(&c);
        let rebuilt = tree.with_leaves(param_specs(&c)).unwrap();
        assert_eq!(rebuilt, tree);
        assert!(tree.with_leaves(vec![0; 3]).is_err());
    }
}
