//! Experiment 2's conversion (`checkpoint convert-pool`): a per-layer MoE
//! checkpoint (`ffn = "moe"`, ours or an imported Qwen3-MoE) becomes a
//! pooled MoE (`ffn = "pooled_moe"`). Every MoE layer's experts go, in
//! layer order, into ONE pool `model.pool.experts.*` [L_moe * E, ...]
//! (pool expert i*E + e is expert e of the i-th MoE layer; `pool_origin`
//! records it); a new global router `model.pool.router.weight` [L_moe * E,
//! D] is drawn from the seed; each layer's original router stays under its
//! name as the distillation teacher. Attention, norms, dense MLPs,
//! embeddings and head are copied unchanged.

use anyhow::{bail, Context, Result};

use crate::model::{init_values, param_specs, FfnKind, ModelConfig, PoolScope, RouterScore};

use super::Tensors;

/// The pooled model of per-layer MoE `src`: `router_score` scores, any
/// pool expert at every MoE layer.
pub fn pooled_model(src: &ModelConfig, score: RouterScore) -> Result<ModelConfig> {
    if src.ffn != FfnKind::Moe {
        bail!(
            "model.ffn = {:?}: convert-pool merges the experts of a per-layer MoE (ffn = \"moe\")",
            src.ffn
        );
    }
    let layers = src.expert_layers();
    let e = src.num_experts;
    let pooled = ModelConfig {
        ffn: FfnKind::PooledMoe,
        num_experts: layers.len() as i64 * e,
        router_score: score,
        pool_scope: PoolScope::Global,
        pool_origin: layers
            .iter()
            .flat_map(|&l| (0..e).map(move |x| [l, x]))
            .collect(),
        pool_source_experts: e,
        ..src.clone()
    };
    pooled.validate().context("the pooled model")?;
    Ok(pooled)
}

/// The pooled model's tensors, in its parameter order, from the per-layer
/// model's `params` (in `src`'s order, as a checkpoint holds them); the
/// global router drawn from `seed`.
pub fn pooled_params(
    src: &ModelConfig,
    pooled: &ModelConfig,
    params: &Tensors,
    seed: u64,
) -> Result<Tensors> {
    let by_name = |name: &str| -> Result<&(String, Vec<i64>, Vec<f32>)> {
        params
            .iter()
            .find(|(n, _, _)| n == name)
            .with_context(|| format!("the per-layer checkpoint has no tensor `{name}`"))
    };
    let layers = src.expert_layers();
    let mut out = Tensors::new();
    for spec in param_specs(pooled) {
        let values = match spec.name.strip_prefix("model.pool.") {
            Some("router.weight") => init_values(&spec, seed),
            Some(expert) => {
                // experts.{gate,up,down}_proj: the layers' stacks, in order.
                let proj = expert.strip_prefix("experts.").unwrap_or(expert);
                let mut v = Vec::with_capacity(spec.num_elements() as usize);
                for l in &layers {
                    let (name, dims, values) =
                        by_name(&format!("model.layers.{l}.mlp.experts.{proj}"))?;
                    if dims[1..] != spec.dims[1..] {
                        bail!(
                            "`{name}` is {dims:?}; the pool's experts are {:?}",
                            &spec.dims[1..]
                        );
                    }
                    v.extend_from_slice(values);
                }
                v
            }
            None => {
                let (name, dims, values) = by_name(&spec.name)?;
                if *dims != spec.dims {
                    bail!("`{name}` is {dims:?}, expected {:?}", spec.dims);
                }
                values.clone()
            }
        };
        if values.len() as i64 != spec.num_elements() {
            bail!(
                "`{}`: {} values for {:?}",
                spec.name,
                values.len(),
                spec.dims
            );
        }
        out.push((spec.name, spec.dims, values));
    }
    Ok(out)
}

/// Keeps the experts `keep` (indices, increasing) of `cfg`'s MoE: of the
/// pool (pooled MoE: `keep[0]`, the pool's rows of experts, global router
/// and `pool_origin`), or of every MoE layer (per-layer MoE: `keep[i]` for
/// the i-th MoE layer, the same count in each, its experts' and router's
/// rows). Returns the pruned model and its tensors in its order.
pub fn prune(
    cfg: &ModelConfig,
    params: &Tensors,
    keep: &[Vec<usize>],
) -> Result<(ModelConfig, Tensors)> {
    let groups = match cfg.ffn {
        FfnKind::PooledMoe | FfnKind::SharedMoe => 1,
        FfnKind::Moe => cfg.expert_layers().len(),
        FfnKind::Dense => bail!("a dense model has no experts to prune"),
    };
    if keep.len() != groups {
        bail!(
            "{} lists of experts to keep for {groups} group(s)",
            keep.len()
        );
    }
    let kept = keep[0].len();
    for (i, k) in keep.iter().enumerate() {
        if k.len() != kept {
            bail!(
                "group {i} keeps {} experts, group 0 {kept}: the same count in every layer",
                k.len()
            );
        }
        if k.windows(2).any(|w| w[0] >= w[1]) || k.iter().any(|&e| e as i64 >= cfg.num_experts) {
            bail!(
                "group {i}: experts to keep {k:?} must be increasing and below {}",
                cfg.num_experts
            );
        }
    }
    if (kept as i64) < cfg.experts_per_token {
        bail!(
            "keeping {kept} experts, fewer than the {} each token chooses (model.experts_per_token)",
            cfg.experts_per_token
        );
    }
    let mut pruned = cfg.clone();
    pruned.num_experts = kept as i64;
    if cfg.ffn == FfnKind::PooledMoe {
        pruned.pool_origin = keep[0].iter().map(|&j| cfg.pool_origin[j]).collect();
    }
    pruned.validate().context("the pruned model")?;
    // Which group's list applies to a tensor with experts along dim 0.
    let group_of = |name: &str| -> Option<usize> {
        if name.starts_with("model.pool.") || name.starts_with("model.shared_moe.") {
            return Some(0);
        }
        let layers = cfg.expert_layers();
        let l: i64 = name
            .strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()?;
        let expert_tensor = name.contains(".mlp.experts.") || name.ends_with(".mlp.gate.weight");
        (cfg.ffn == FfnKind::Moe && expert_tensor)
            .then(|| layers.iter().position(|&x| x == l))
            .flatten()
    };
    let mut out = Tensors::new();
    for spec in param_specs(&pruned) {
        let (name, dims, values) = params
            .iter()
            .find(|(n, _, _)| *n == spec.name)
            .with_context(|| format!("the checkpoint has no tensor `{}`", spec.name))?;
        let values = match group_of(name) {
            Some(g) => {
                let row: usize = dims[1..].iter().product::<i64>() as usize;
                keep[g]
                    .iter()
                    .flat_map(|&e| values[e * row..(e + 1) * row].iter().copied())
                    .collect()
            }
            None => values.clone(),
        };
        if values.len() as i64 != spec.num_elements() {
            bail!(
                "`{name}`: {} values after pruning for {:?}",
                values.len(),
                spec.dims
            );
        }
        out.push((spec.name, spec.dims, values));
    }
    Ok((pruned, out))
}
