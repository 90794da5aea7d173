//! Model FLOPs utilisation: the model FLOPs of a training step per token
//! and the peak FLOP/s of a device, measured where no figure is documented.

use std::time::Instant;

use anyhow::Result;

use crate::graph::{DType, Graph, TensorType};
use crate::model::active_params_per_token;
use crate::runtime::{Arg, Client};

use super::config::Config;

/// Model FLOPs per token for one training step: 6 * active parameters
/// (forward + backward matmuls) + 12 * layers * seq * hidden (attention
/// scores and values), the nanoGPT/PaLM estimate, counting only the routed
/// experts for the MoE.
pub fn flops_per_token(cfg: &Config) -> f64 {
    let m = &cfg.model;
    6.0 * active_params_per_token(m) as f64
        + 12.0 * (m.num_layers * cfg.train.seq_len * m.hidden_size) as f64
}

/// Peak FLOP/s of one device: the documented dense bf16 peak for known
/// accelerators; for anything else (CPUs) the best of a few measured
/// 2048^3 f32 matmuls, so MFU there means "fraction of what this machine's
/// XLA matmul reaches".
pub fn device_peak_flops(client: &Client) -> Option<f64> {
    let kind = client
        .devices()
        .first()
        .map(|d| d.kind().to_lowercase())
        .unwrap_or_default();
    let documented = [
        ("tpu v4", 275e12),
        ("h100", 989e12),
        ("h200", 989e12),
        ("a100", 312e12),
    ];
    if let Some((_, peak)) = documented.iter().find(|(k, _)| kind.contains(k)) {
        return Some(*peak);
    }
    match measured_matmul_flops(client) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!("could not measure a matmul peak for MFU: {e:#}");
            None
        }
    }
}

fn measured_matmul_flops(client: &Client) -> Result<f64> {
    let n = 2048i64;
    let g = Graph::new();
    let a = g.param("a", TensorType::new(DType::F32, &[n, n]))?;
    let b = g.param("b", TensorType::new(DType::F32, &[n, n]))?;
    let exe = g.build(&[&a.matmul(&b)?])?.compile(client)?;
    let dev = &client.devices()[0];
    let ones = vec![1f32; (n * n) as usize];
    let (x, y) = (
        client.buffer_from_host(&ones, &[n, n], dev)?,
        client.buffer_from_host(&ones, &[n, n], dev)?,
    );
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        let out = exe.execute(vec![vec![Arg::Borrowed(&x), Arg::Borrowed(&y)]])?;
        out[0][0].to_bytes()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let peak = 2.0 * (n * n * n) as f64 / best;
    tracing::info!(
        "measured matmul peak {:.1} GFLOP/s per device (for MFU)",
        peak / 1e9
    );
    Ok(peak)
}
