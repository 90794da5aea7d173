//! The two Experiment-1 models (SPEC.md) built from `graph`: the dense
//! LLaMA baseline and the shared-MoE proposal, their parameters (names,
//! shapes, initialisation, exact counts) and their loss.
//!
//! Where to look: `layers` (RMSNorm, RoPE, attention, SwiGLU), `moe` (the
//! router, the experts, the balance loss), `transformer` (embeddings, the
//! blocks, logits, loss), `params` (naming, init, counting), `config`.

pub mod config;
pub mod generate;
pub mod layers;
pub mod moe;
pub mod params;
pub mod routing;
pub mod transformer;

pub use config::{FfnKind, ModelConfig};
pub use moe::ExpertCompute;
pub use params::{
    active_params_per_token, count_breakdown, count_params, declare_params, init_params,
    param_specs, ParamSpec,
};
pub use transformer::{Loss, Transformer};
