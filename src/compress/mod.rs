//! Post-training compression on the host: SparseGPT and magnitude pruning
//! of linear layers ([`sparsegpt`]) and bitsandbytes' NF4 quantisation
//! with double-quantised block scales ([`nf4`]). Pure numerics over
//! row-major f32 matrices; the compiled programs that gather calibration
//! statistics and run NF4 weights live in `model` and `cli::compress`.

pub mod nf4;
pub mod sparsegpt;
