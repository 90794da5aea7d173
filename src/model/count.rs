//! Exact parameter counts of a model, from its shape (not by listing every
//! tensor, so an absurd `num_layers` costs nothing), with checked
//! arithmetic; and the parameters a token uses (the N of 6N FLOPs).

use super::config::{FfnKind, ModelConfig};

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
fn product(what: &str, factors: &[Factor]) -> anyhow::Result<i64> {
    factors
        .iter()
        .try_fold(1i64, |acc, &(_, v)| acc.checked_mul(v))
        .ok_or_else(|| anyhow::anyhow!(overflow(what, factors)))
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

fn sum(what: &str, parts: &[i64]) -> anyhow::Result<i64> {
    parts
        .iter()
        .try_fold(0i64, |acc, &v| acc.checked_add(v))
        .ok_or_else(|| anyhow::anyhow!("the {what} overflows a 64-bit count (parts: {parts:?})"))
}

/// Every count of `c` with checked arithmetic: an error names the fields
/// whose product overflows i64, or says that the training state (16 bytes
/// per parameter) would not fit a 64-bit address space. Expects the
/// shape checks of [`ModelConfig::validate`] (positive sizes) to pass.
pub fn checked_counts(c: &ModelConfig) -> anyhow::Result<Counts> {
    const V: &str = "model.vocab_size";
    const D: &str = "model.hidden_size";
    const E: &str = "model.embedding_dim";
    const L: &str = "model.num_layers";
    const F: &str = "model.intermediate_size";
    const X: &str = "model.num_experts";
    const XF: &str = "model.expert_intermediate_size";
    const K: &str = "model.experts_per_token";
    const KV: &str = "model.num_kv_heads * head_dim";
    const Q: &str = "model.num_heads * head_dim";
    const HD: &str = "head_dim";
    let (v, d, l) = (c.vocab_size, c.hidden_size, c.num_layers);
    let kv = c.num_kv_heads.checked_mul(c.head_dim()).unwrap_or(i64::MAX);
    let q = c.num_heads.checked_mul(c.head_dim()).unwrap_or(i64::MAX);
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
    let head = if c.tie_word_embeddings {
        0
    } else {
        product("output head", &[(V, v), (D, d)])?
    };
    let embedding = sum("embedding parameter count", &[embedding, head])?;
    let attention_layer = sum(
        "attention parameter count of a layer",
        &[
            product("q_proj weight", &[(D, d), (Q, q)])?,
            product("k_proj weight", &[(KV, kv), (D, d)])?,
            product("v_proj weight", &[(KV, kv), (D, d)])?,
            product("o_proj weight", &[(D, d), (Q, q)])?,
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
            if c.qk_norm {
                product(
                    "q/k norm gains",
                    &[(L, l), (HD, c.head_dim()), ("norms per layer", 2)],
                )?
            } else {
                0
            },
            d,
        ],
    )?;
    let (mut mlp, mut router, mut experts, mut active_moe) = (0, 0, 0, 0);
    // The MLPs of a per-layer or pooled MoE's layers without experts.
    let dense_layers_mlp = |moe_layers: i64| {
        product(
            "MLP parameter count",
            &[
                ("dense layers", l - moe_layers),
                (F, c.intermediate_size),
                (D, d),
                ("weights per layer", 3),
            ],
        )
    };
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
        FfnKind::Moe => {
            let (x, f, k) = (
                c.num_experts,
                c.expert_intermediate_size,
                c.experts_per_token,
            );
            const LM: &str = "MoE layers";
            let moe_layers = c.expert_layers().len() as i64;
            mlp = dense_layers_mlp(moe_layers)?;
            router = product("router weights", &[(LM, moe_layers), (X, x), (D, d)])?;
            experts = product(
                "expert parameter count",
                &[(LM, moe_layers), (X, x), (XF, f), (D, d), ("weights", 3)],
            )?;
            // Used per token: each MoE layer's router, and k of its experts.
            let routed = product(
                "routed expert weights used per token",
                &[(LM, moe_layers), (XF, f), (D, d), (K, k), ("weights", 3)],
            )?;
            active_moe = sum("parameters used per token", &[routed, router])?;
        }
        FfnKind::PooledMoe => {
            let (x, f, k) = (
                c.num_experts,
                c.expert_intermediate_size,
                c.experts_per_token,
            );
            const LM: &str = "MoE layers";
            let moe_layers = c.expert_layers().len() as i64;
            mlp = dense_layers_mlp(moe_layers)?;
            // The global router, and each MoE layer's original router (the
            // distillation teacher, which the forward does not use).
            let global = product("router weight", &[(X, x), (D, d)])?;
            let teachers = product(
                "teacher router weights",
                &[
                    (LM, moe_layers),
                    ("source experts", c.pool_source_experts),
                    (D, d),
                ],
            )?;
            router = sum("router weights", &[global, teachers])?;
            experts = product(
                "expert parameter count",
                &[(X, x), (XF, f), (D, d), ("weights", 3)],
            )?;
            let routed = product(
                "routed expert weights used per token",
                &[(LM, moe_layers), (XF, f), (D, d), (K, k), ("weights", 3)],
            )?;
            let routing = product(
                "router weights used per token",
                &[(X, x), (D, d), (LM, moe_layers)],
            )?;
            active_moe = sum("parameters used per token", &[routed, routing])?;
        }
    }
    // An untied model's input table is a lookup, not a matmul: not in N.
    let table_lookup = if c.tie_word_embeddings {
        0
    } else {
        embedding - head
    };
    let total = sum(
        "parameter count",
        &[embedding, attention, norms, mlp, router, experts],
    )?;
    let active_per_token = sum(
        "parameters used per token",
        &[embedding - table_lookup, attention, norms, mlp, active_moe],
    )?;
    if total.checked_mul(TRAINING_BYTES_PER_PARAM).is_none() {
        anyhow::bail!(
            "model.hidden_size = {d}, model.num_layers = {l}, model.vocab_size = {v}: {total} parameters \
             need {TRAINING_BYTES_PER_PARAM} bytes each of training state, more than a 64-bit address space"
        );
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
/// excluding the embedding lookup but including the output projection
/// (the tied table, or the untied head; an untied model's input table is
/// left out).
pub fn active_params_per_token(c: &ModelConfig) -> i64 {
    counts(c).active_per_token
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{Params, Role};

    #[test]
    fn exact_counts_of_the_spec() {
        assert_eq!(count_params(&ModelConfig::dense125m()), 137_841_408);
        assert_eq!(count_params(&ModelConfig::sharedmoe50m()), 49_642_240);
        let b = count_breakdown(&ModelConfig::sharedmoe50m());
        assert_eq!(b.last().unwrap(), &("total", 49_642_240));
        assert!(b.contains(&("experts", 26_542_080)) && b.contains(&("router", 12_288)));
    }

    /// The counts from the shape equal those of the listed tensors, by
    /// role; the active count uses k of E experts and the router once per
    /// layer.
    #[test]
    fn counts_match_the_tensor_tree() {
        for name in crate::model::config::PRESET_NAMES {
            let c = ModelConfig::preset(name).unwrap();
            let tree = Params::spec(&c);
            let specs = tree.leaves();
            let listed: i64 = specs.iter().map(|s| s.num_elements()).sum();
            assert_eq!(count_params(&c), listed, "{name}");
            let of = |role: Role| -> i64 {
                specs
                    .iter()
                    .filter(|s| s.role == role)
                    .map(|s| s.num_elements())
                    .sum()
            };
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
                [
                    of(Role::Embedding),
                    of(Role::Attention),
                    of(Role::Norm),
                    of(Role::Mlp),
                    of(Role::Router),
                    of(Role::Experts)
                ],
                "{name}"
            );
            // Each layer applies the shared block; a per-layer MoE's
            // experts and routers are each applied once.
            let applied = if c.ffn == FfnKind::SharedMoe {
                c.num_layers
            } else {
                1
            };
            let lookup = if c.tie_word_embeddings {
                0
            } else {
                specs
                    .iter()
                    .find(|s| s.name == "model.embed_tokens.weight")
                    .unwrap()
                    .num_elements()
            };
            let active = listed - lookup - of(Role::Experts) - of(Role::Router)
                + of(Role::Experts) / c.num_experts.max(1) * c.experts_per_token * applied
                + of(Role::Router) * applied;
            assert_eq!(n.active_per_token, active, "{name}");
        }
    }

    /// Qwen3-30B-A3B against its published 30.5B total and 3.3B active:
    /// our N leaves out the 0.31B input-table lookup, which the published
    /// active figure counts.
    #[test]
    fn qwen3_30b_a3b_counts() {
        let c = ModelConfig::qwen3_30b_a3b();
        let n = checked_counts(&c).unwrap();
        assert_eq!(n.total, 30_532_122_624);
        let table = 151_936 * 2048;
        assert_eq!(n.active_per_token + table, 3_353_032_704);
        assert_eq!(n.experts, 48 * 128 * 3 * 768 * 2048);
    }

    #[test]
    fn overflowing_counts_name_the_field() {
        let mut c = ModelConfig::preset("tiny-sharedmoe").unwrap();
        c.hidden_size = 1 << 40;
        let e = checked_counts(&c).unwrap_err().to_string();
        assert!(e.starts_with("model.hidden_size = 1099511627776"), "{e}");
        assert!(e.contains("overflows a 64-bit count"), "{e}");
        let mut c = ModelConfig::preset("tiny-dense").unwrap();
        c.num_layers = 1 << 50;
        let e = checked_counts(&c).unwrap_err().to_string();
        assert!(e.contains("model.num_layers = 1125899906842624"), "{e}");
    }
}
