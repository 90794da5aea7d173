//! The decoding programs (traced, not run): one position with key/value
//! caches, and the cache-free full forward that is its reference. Running
//! them (devices, caches, sampling) is the job of the `generate` module
//! above.

use crate::graph::{DType, Function, Graph, Result, TensorType};

use super::stored::{declare_stored_params, input_count, Storage};
use super::{ModelConfig, Transformer};

/// One decoding position for sequences of up to `max_len` tokens:
/// params (stored as `layout` says, checkpoint order; see
/// [`declare_stored_params`]), token [1, 1] (i32), pos (i32 scalar),
/// then per layer l the caches k.l, v.l [1, K, max_len, Hd] (f32, donated)
/// -> logits [1, V], then the caches with `pos` written, in the same order.
pub fn decode_step_program(
    cfg: &ModelConfig,
    layout: &[Storage],
    max_len: i64,
) -> Result<Function> {
    let (layers, kv, hd) = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim());
    let n = input_count(layout);
    let g = Graph::new();
    let params = declare_stored_params(&g, cfg, layout)?;
    let token = g.param("token", TensorType::new(DType::I32, &[1, 1]))?;
    let pos = g.param("pos", TensorType::scalar(DType::I32))?;
    let cache_ty = TensorType::new(DType::F32, &[1, kv, max_len, hd]);
    let caches = (0..layers)
        .map(|l| {
            Ok((
                g.param(&format!("cache_k.{l}"), cache_ty.clone())?,
                g.param(&format!("cache_v.{l}"), cache_ty.clone())?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let model = Transformer::new(cfg, &params, DType::F32)?;
    let (h, caches) = model.decode(&token, &pos, &caches)?;
    let logits = model.logits(&h)?.reshape(&[1, cfg.vocab_size])?;
    let mut outs = vec![&logits];
    for (k, v) in &caches {
        outs.extend([k, v]);
    }
    let donated: Vec<usize> = (n + 2..n + 2 + 2 * layers as usize).collect();
    g.build(&outs)?.with_name("decode_step").donate(&donated)
}

/// The reference: params (as `layout` says), tokens [1, max_len] (i32)
/// -> logits [1, max_len, V] at every position.
pub fn full_forward_program(
    cfg: &ModelConfig,
    layout: &[Storage],
    max_len: i64,
) -> Result<Function> {
    let g = Graph::new();
    let params = declare_stored_params(&g, cfg, layout)?;
    let tokens = g.param("tokens", TensorType::new(DType::I32, &[1, max_len]))?;
    let model = Transformer::new(cfg, &params, DType::F32)?;
    let (h, _) = model.hidden(&tokens)?;
    let logits = model.logits(&h)?;
    Ok(g.build(&[&logits])?.with_name("full_forward"))
}
