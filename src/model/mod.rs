//! The two Experiment-1 models (SPEC.md) built from `graph`: the dense
//! LLaMA baseline and the shared-MoE proposal.
//!
//! Read top-down:
//! - `config`: the hyper-parameters, presets and their validation;
//! - `params`: the parameter tree (the one place tensor names are
//!   spelled), roles, initialisation; `count`: exact counts;
//! - `layers`: RMSNorm, RoPE, attention, SwiGLU;
//! - `moe`: the router, the experts (routed or dense), the balance loss;
//! - `transformer`: embeddings, the blocks, logits, the loss;
//! - `decode` (cached decoding programs), `routing` (what the shared
//!   router chooses) and `calibration` (pruning's input statistics), all
//!   over the same forward;
//! - `stored`: parameters as compressed checkpoints hold them (bf16,
//!   NF4), dequantised inside the programs.
//!
//! Everything here traces `graph` programs; nothing runs them (no
//! `runtime`, no checkpoints).

pub mod calibration;
pub mod config;
pub mod count;
pub mod decode;
pub mod distill;
pub mod layers;
pub mod moe;
pub mod params;
pub mod reap;
pub mod routing;
pub mod stored;
pub mod transformer;

pub use config::{FfnKind, ModelConfig, PoolScope, RouterScore};
pub use count::{active_params_per_token, count_breakdown, count_params};
pub use moe::ExpertCompute;
pub use params::{declare_params, init_params, init_values, param_specs, ParamSpec, Params, Role};
pub use transformer::{LayerRouter, Loss, Observer, Site, Transformer};
