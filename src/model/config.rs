//! Model hyper-parameters: the two Experiment-1 presets of SPEC.md, small
//! ones for tests and CPU runs, validation with messages naming the field.

use serde::{Deserialize, Serialize};

/// What the feed-forward half of each block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    /// A SwiGLU MLP per layer (the dense LLaMA baseline).
    Dense,
    /// ONE mixture-of-experts block shared by every layer.
    SharedMoe,
    /// Per-layer mixture-of-experts blocks, each with its own router and
    /// experts (the Qwen3-MoE architecture); layers listed in
    /// `mlp_only_layers`, or off the `decoder_sparse_step`, have a dense
    /// SwiGLU MLP of `intermediate_size` instead.
    Moe,
    /// Experiment 2: a per-layer MoE whose experts were merged into ONE
    /// pool of `num_experts` (`model.pool.*`) with one global router used
    /// at every MoE layer (those of `mlp_only_layers` /
    /// `decoder_sparse_step` as in `Moe`; the others keep their MLP).
    /// Each MoE layer also keeps its original router as the distillation
    /// teacher (`model.layers.{l}.mlp.gate.weight`, [pool_source_experts,
    /// D]), which the forward does not use.
    #[serde(rename = "pooled_moe")]
    PooledMoe,
}

/// How a router turns logits into scores before its top-k.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterScore {
    /// softmax over the experts (LLaMA-MoE, Qwen3, the shared block).
    #[default]
    Softmax,
    /// sigmoid per expert (DeepSeek-V3): a_e = sigmoid(logit_e).
    Sigmoid,
}

/// Which experts of the pool a pooled-MoE layer may choose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolScope {
    /// Any expert of the pool, at every layer (the experiment).
    #[default]
    Global,
    /// Only the experts that came from this layer (`pool_origin`): the
    /// original model's routing, for checking the conversion.
    Layer,
}

/// Shape of a LLaMA-style model (dense) or of the shared-MoE proposal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub ffn: FfnKind,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    /// SwiGLU intermediate size of the dense FFN.
    #[serde(default)]
    pub intermediate_size: i64,
    /// Width of the factorised tied embedding (table [V, e], projection
    /// [d, e]); 0 = a plain tied [V, d] table.
    #[serde(default)]
    pub embedding_dim: i64,
    #[serde(default)]
    pub num_experts: i64,
    #[serde(default)]
    pub experts_per_token: i64,
    #[serde(default)]
    pub expert_intermediate_size: i64,
    /// Coefficient of the Switch-style balance loss.
    #[serde(default)]
    pub aux_loss_coef: f64,
    /// Token block of the routed expert matmuls: each expert's tokens are
    /// padded to a multiple of it (smaller = less padding, more blocks).
    /// 0 = chosen from the micro-batch size (padding at most ~25%).
    #[serde(default)]
    pub moe_block_size: i64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Width of one attention head; 0 = hidden_size / num_heads. Qwen3
    /// sets it independently (128 for 30B-A3B, where hidden / heads = 64):
    /// q_proj is then [heads * head_dim, hidden].
    #[serde(default)]
    pub head_dim: i64,
    /// An RMSNorm over head_dim on each query and key head, before RoPE
    /// (Qwen3's `q_norm` / `k_norm`).
    #[serde(default)]
    pub qk_norm: bool,
    /// The output logits reuse the token embedding (true), or have their
    /// own `lm_head.weight` [V, D] (Qwen3-MoE).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Divide the chosen experts' router probabilities by their sum
    /// (Qwen3's `norm_topk_prob`). The shared MoE always does.
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    /// Per-layer MoE: layer l has experts iff it is not in
    /// `mlp_only_layers` and (l + 1) % decoder_sparse_step == 0.
    #[serde(default = "default_one")]
    pub decoder_sparse_step: i64,
    #[serde(default)]
    pub mlp_only_layers: Vec<i64>,
    /// Router scores (pooled MoE; the other families use softmax).
    #[serde(default, skip_serializing_if = "is_default")]
    pub router_score: RouterScore,
    /// Pooled MoE: which pool experts a layer may choose.
    #[serde(default, skip_serializing_if = "is_default")]
    pub pool_scope: PoolScope,
    /// Pooled MoE: where each pool expert came from, [layer, expert] of
    /// the per-layer model (kept through pruning).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool_origin: Vec<[i64; 2]>,
    /// Pooled MoE: experts per layer of the per-layer model (the teacher
    /// routers' rows).
    #[serde(default, skip_serializing_if = "is_default")]
    pub pool_source_experts: i64,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_true() -> bool {
    true
}
fn default_one() -> i64 {
    1
}

fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-5
}

/// The names [`ModelConfig::preset`] knows.
pub const PRESET_NAMES: &[&str] = &[
    "dense125m",
    "sharedmoe50m",
    "small-dense",
    "small-sharedmoe",
    "tiny-dense",
    "tiny-sharedmoe",
    "tiny-moe",
    "qwen3-30b-a3b",
];

impl ModelConfig {
    /// The 125M dense LLaMA baseline (thesis table 3.1).
    pub fn dense125m() -> ModelConfig {
        ModelConfig {
            ffn: FfnKind::Dense,
            vocab_size: 32_000,
            hidden_size: 768,
            num_layers: 12,
            num_heads: 12,
            num_kv_heads: 12,
            intermediate_size: 3072,
            embedding_dim: 0,
            num_experts: 0,
            experts_per_token: 0,
            expert_intermediate_size: 0,
            aux_loss_coef: 0.0,
            moe_block_size: 0,
            rope_theta: default_theta(),
            rms_norm_eps: default_eps(),
            head_dim: 0,
            qk_norm: false,
            tie_word_embeddings: true,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
            router_score: RouterScore::Softmax,
            pool_scope: PoolScope::Global,
            pool_origin: vec![],
            pool_source_experts: 0,
        }
    }

    /// Qwen3-30B-A3B's architecture (its config.json): 48 layers of 128
    /// experts, top-8, with qk-norm, head_dim 128 and an untied head.
    /// For the ahead-of-time compile and counts, not for CPU training.
    pub fn qwen3_30b_a3b() -> ModelConfig {
        ModelConfig {
            ffn: FfnKind::Moe,
            vocab_size: 151_936,
            hidden_size: 2048,
            num_layers: 48,
            num_heads: 32,
            num_kv_heads: 4,
            intermediate_size: 6144,
            embedding_dim: 0,
            num_experts: 128,
            experts_per_token: 8,
            expert_intermediate_size: 768,
            aux_loss_coef: 0.001,
            moe_block_size: 0,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            head_dim: 128,
            qk_norm: true,
            tie_word_embeddings: false,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
            router_score: RouterScore::Softmax,
            pool_scope: PoolScope::Global,
            pool_origin: vec![],
            pool_source_experts: 0,
        }
    }

    /// The 50M shared-MoE proposal (thesis tables 3.2-3.3).
    pub fn sharedmoe50m() -> ModelConfig {
        ModelConfig {
            ffn: FfnKind::SharedMoe,
            num_kv_heads: 4,
            intermediate_size: 0,
            embedding_dim: 128,
            num_experts: 16,
            experts_per_token: 2,
            expert_intermediate_size: 720,
            aux_loss_coef: 0.01,
            ..ModelConfig::dense125m()
        }
    }

    /// The laptop-scale pair of Experiment 1 (`small-dense`,
    /// `small-sharedmoe`): the full models' architecture at d = 192 with an
    /// 8,192-token vocabulary. Kept: 12 layers; 16 experts, top-2, balance
    /// coefficient 0.01; the dense model's full multi-head attention and
    /// the shared MoE's GQA 3:1 (6 query / 2 key-value heads, head_dim 32);
    /// tied embeddings, factorised in the shared MoE with e/d = 1/6 (32);
    /// dense FFN 4d (768), expert FFN 0.9375d (180). The parameter ratio
    /// dense / shared MoE comes out at 2.78, the full models' ratio.
    fn small(dense: bool) -> ModelConfig {
        let base = if dense {
            ModelConfig::dense125m()
        } else {
            ModelConfig::sharedmoe50m()
        };
        ModelConfig {
            vocab_size: 8192,
            hidden_size: 192,
            num_heads: 6,
            num_kv_heads: if dense { 6 } else { 2 },
            intermediate_size: if dense { 768 } else { 0 },
            embedding_dim: if dense { 0 } else { 32 },
            expert_intermediate_size: if dense { 0 } else { 180 },
            ..base
        }
    }

    /// A preset by name: `dense125m`, `sharedmoe50m`, `small-dense`,
    /// `small-sharedmoe`, `tiny-dense`, `tiny-sharedmoe`.
    pub fn preset(name: &str) -> Option<ModelConfig> {
        Some(match name {
            "dense125m" => ModelConfig::dense125m(),
            "sharedmoe50m" => ModelConfig::sharedmoe50m(),
            "small-dense" => ModelConfig::small(true),
            "small-sharedmoe" => ModelConfig::small(false),
            "tiny-dense" => ModelConfig {
                vocab_size: 256,
                hidden_size: 64,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 4,
                intermediate_size: 128,
                ..ModelConfig::dense125m()
            },
            "tiny-sharedmoe" => ModelConfig {
                vocab_size: 256,
                hidden_size: 64,
                num_layers: 2,
                num_heads: 4,
                num_kv_heads: 2,
                embedding_dim: 16,
                num_experts: 4,
                expert_intermediate_size: 32,
                moe_block_size: 8,
                ..ModelConfig::sharedmoe50m()
            },
            // Qwen3-MoE in miniature, every feature on: layer 1 dense
            // (mlp_only_layers), head_dim 32 against hidden / heads = 16,
            // qk-norm, an untied head.
            "tiny-moe" => ModelConfig {
                vocab_size: 256,
                hidden_size: 64,
                num_layers: 3,
                num_heads: 4,
                num_kv_heads: 2,
                intermediate_size: 128,
                num_experts: 8,
                experts_per_token: 2,
                expert_intermediate_size: 32,
                moe_block_size: 8,
                rope_theta: 10_000.0,
                head_dim: 32,
                mlp_only_layers: vec![1],
                ..ModelConfig::qwen3_30b_a3b()
            },
            "qwen3-30b-a3b" => ModelConfig::qwen3_30b_a3b(),
            _ => return None,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        if self.head_dim > 0 {
            self.head_dim
        } else {
            self.hidden_size / self.num_heads.max(1)
        }
    }

    /// Width of all query heads (q_proj's rows, o_proj's columns).
    pub fn q_dim(&self) -> i64 {
        self.num_heads * self.head_dim()
    }

    pub fn kv_dim(&self) -> i64 {
        self.num_kv_heads * self.head_dim()
    }

    /// Whether the model routes tokens to experts (shared or per layer):
    /// it then has a balance loss.
    pub fn is_moe(&self) -> bool {
        matches!(
            self.ffn,
            FfnKind::SharedMoe | FfnKind::Moe | FfnKind::PooledMoe
        )
    }

    /// Whether layer `l` of a per-layer MoE has experts (Qwen3-MoE's rule);
    /// false for the other families.
    pub fn layer_has_experts(&self, l: i64) -> bool {
        matches!(self.ffn, FfnKind::Moe | FfnKind::PooledMoe)
            && !self.mlp_only_layers.contains(&l)
            && (l + 1) % self.decoder_sparse_step.max(1) == 0
    }

    /// The layers of a per-layer MoE that have experts.
    pub fn expert_layers(&self) -> Vec<i64> {
        (0..self.num_layers)
            .filter(|&l| self.layer_has_experts(l))
            .collect()
    }

    /// The pool's provenance: one origin per pool expert, each a MoE layer
    /// and an expert of the per-layer model.
    fn validate_pool(&self) -> anyhow::Result<()> {
        if self.pool_origin.len() as i64 != self.num_experts {
            anyhow::bail!(
                "model.pool_origin has {} entries for model.num_experts = {} pool experts",
                self.pool_origin.len(),
                self.num_experts
            );
        }
        if self.pool_source_experts <= 0 {
            anyhow::bail!(
                "model.pool_source_experts = {}: must be the per-layer model's experts per layer",
                self.pool_source_experts
            );
        }
        let layers = self.expert_layers();
        for (j, &[l, e]) in self.pool_origin.iter().enumerate() {
            if !layers.contains(&l) || !(0..self.pool_source_experts).contains(&e) {
                anyhow::bail!(
                    "model.pool_origin[{j}] = [{l}, {e}]: expected a MoE layer of {layers:?} and an \
                     expert in 0..{}",
                    self.pool_source_experts
                );
            }
        }
        Ok(())
    }

    /// The expert fields of an MoE family (`what`), naming the field.
    fn validate_experts(&self, what: &str) -> anyhow::Result<()> {
        if self.num_experts <= 0 || self.expert_intermediate_size <= 0 || self.moe_block_size < 0 {
            anyhow::bail!(
                "model.num_experts = {} and model.expert_intermediate_size = {} must be positive, model.moe_block_size = {} >= 0, for {what}",
                self.num_experts, self.expert_intermediate_size, self.moe_block_size
            );
        }
        if self.experts_per_token <= 0 || self.experts_per_token > self.num_experts {
            anyhow::bail!(
                "model.experts_per_token = {} must be in 1..={} (model.num_experts)",
                self.experts_per_token,
                self.num_experts
            );
        }
        Ok(())
    }

    /// Refuses impossible shapes, naming the field (`model.<name>`).
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
        ];
        for (name, v) in positive {
            if v <= 0 {
                anyhow::bail!("model.{name} = {v}: must be positive");
            }
        }
        if self.head_dim < 0 {
            anyhow::bail!(
                "model.head_dim = {}: must be >= 0 (0 = hidden_size / num_heads)",
                self.head_dim
            );
        }
        if self.head_dim == 0 && self.hidden_size % self.num_heads != 0 {
            anyhow::bail!(
                "model.num_heads = {} does not divide model.hidden_size = {}",
                self.num_heads,
                self.hidden_size
            );
        }
        if self.head_dim() % 2 != 0 {
            anyhow::bail!(
                "the head dimension (model.head_dim, or hidden_size / num_heads) = {} must be even for RoPE",
                self.head_dim()
            );
        }
        if self.num_heads % self.num_kv_heads != 0 {
            anyhow::bail!(
                "model.num_kv_heads = {} does not divide model.num_heads = {}",
                self.num_kv_heads,
                self.num_heads
            );
        }
        if self.embedding_dim < 0 {
            anyhow::bail!(
                "model.embedding_dim = {}: must be >= 0 (0 = unfactorised)",
                self.embedding_dim
            );
        }
        match self.ffn {
            FfnKind::Dense if self.intermediate_size <= 0 => {
                anyhow::bail!(
                    "model.intermediate_size = {}: must be positive for a dense FFN",
                    self.intermediate_size
                )
            }
            FfnKind::Moe | FfnKind::PooledMoe => {
                if self.ffn == FfnKind::PooledMoe {
                    self.validate_pool()?;
                }
                self.validate_experts("a per-layer MoE")?;
                if self.decoder_sparse_step < 1 {
                    anyhow::bail!(
                        "model.decoder_sparse_step = {}: must be >= 1",
                        self.decoder_sparse_step
                    );
                }
                if let Some(l) = self
                    .mlp_only_layers
                    .iter()
                    .find(|&&l| l < 0 || l >= self.num_layers)
                {
                    anyhow::bail!(
                        "model.mlp_only_layers contains {l}: layers are 0..{}",
                        self.num_layers
                    );
                }
                let dense_layers = self.num_layers - self.expert_layers().len() as i64;
                if dense_layers > 0 && self.intermediate_size <= 0 {
                    anyhow::bail!(
                        "model.intermediate_size = {}: must be positive, {dense_layers} layer(s) have a dense MLP",
                        self.intermediate_size
                    );
                }
            }
            FfnKind::SharedMoe => self.validate_experts("a shared MoE")?,
            FfnKind::Dense => {}
        }
        for (name, v) in [
            ("rms_norm_eps", self.rms_norm_eps),
            ("rope_theta", self.rope_theta),
            ("aux_loss_coef", self.aux_loss_coef),
        ] {
            if !v.is_finite() {
                anyhow::bail!("model.{name} = {v}: must be a finite number");
            }
        }
        let bad = self.rms_norm_eps <= 0.0 || self.rope_theta <= 0.0 || self.aux_loss_coef < 0.0;
        if bad {
            anyhow::bail!(
                "model.rms_norm_eps = {} and model.rope_theta = {} must be positive, model.aux_loss_coef = {} >= 0",
                self.rms_norm_eps, self.rope_theta, self.aux_loss_coef
            );
        }
        if self.vocab_size > i32::MAX as i64 {
            anyhow::bail!(
                "model.vocab_size = {}: token ids are i32, so at most {}",
                self.vocab_size,
                i32::MAX
            );
        }
        // Every parameter count in checked arithmetic (names the fields
        // whose product overflows).
        super::count::checked_counts(self)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in PRESET_NAMES {
            ModelConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn impossible_shapes_name_the_field() {
        let mut c = ModelConfig::dense125m();
        c.num_heads = 7;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.num_heads = 7 does not divide model.hidden_size = 768"));
        let mut c = ModelConfig::sharedmoe50m();
        c.num_kv_heads = 5;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.num_kv_heads = 5"));
        let mut c = ModelConfig::sharedmoe50m();
        c.experts_per_token = 17;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.experts_per_token = 17"));
    }

    #[test]
    fn overflowing_and_non_finite_values_are_refused() {
        let mut c = ModelConfig::preset("tiny-sharedmoe").unwrap();
        c.hidden_size = 1 << 40;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("model.hidden_size = 1099511627776") && e.contains("overflows"),
            "{e}"
        );
        let mut c = ModelConfig::preset("tiny-dense").unwrap();
        c.rope_theta = f64::INFINITY;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.rope_theta = inf"));
        let mut c = ModelConfig::preset("tiny-dense").unwrap();
        c.rms_norm_eps = f64::NAN;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("model.rms_norm_eps = NaN"));
    }
}
