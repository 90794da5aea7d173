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
            _ => return None,
        })
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads.max(1)
    }

    pub fn kv_dim(&self) -> i64 {
        self.num_kv_heads * self.head_dim()
    }

    pub fn is_moe(&self) -> bool {
        self.ffn == FfnKind::SharedMoe
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
        if self.hidden_size % self.num_heads != 0 {
            anyhow::bail!(
                "model.num_heads = {} does not divide model.hidden_size = {}",
                self.num_heads,
                self.hidden_size
            );
        }
        if self.head_dim() % 2 != 0 {
            anyhow::bail!(
                "model.hidden_size / model.num_heads = {} must be even for RoPE",
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
            FfnKind::SharedMoe => {
                if self.num_experts <= 0
                    || self.expert_intermediate_size <= 0
                    || self.moe_block_size < 0
                {
                    anyhow::bail!(
                        "model.num_experts = {} and model.expert_intermediate_size = {} must be positive, model.moe_block_size = {} >= 0, for a shared MoE",
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
            }
            _ => {}
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
