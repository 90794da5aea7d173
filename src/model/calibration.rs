//! The calibration statistics of pruning (SparseGPT): for every linear
//! layer of a dense model's blocks, the Gram matrix sum x x^T of its
//! inputs over a batch of tokens, traced over the same forward as
//! training ([`Transformer::hidden_observed`]).

use crate::graph::{DType, DotDims, Function, Graph, Result, Tensor, TensorType};

use super::params::{declare_params, Attention, Layer, LayerFfn, Mlp};
use super::transformer::{Site, Transformer};
use super::ModelConfig;

/// The input a block's linear layers read: q, k and v share one, gate and
/// up share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearInput {
    /// RMSNorm(h) entering attention: q, k, v.
    Attention,
    /// The heads' outputs: o.
    Heads,
    /// RMSNorm(h) entering the MLP: gate, up.
    Mlp,
    /// silu(gate(x)) * up(x): down.
    Hidden,
}

impl LinearInput {
    /// In the order [`gram_program`] returns them per layer.
    pub const ALL: [LinearInput; 4] = [
        LinearInput::Attention,
        LinearInput::Heads,
        LinearInput::Mlp,
        LinearInput::Hidden,
    ];

    fn of(site: Site) -> Option<LinearInput> {
        match site {
            Site::AttentionInput => Some(LinearInput::Attention),
            Site::AttentionHeads => Some(LinearInput::Heads),
            Site::MlpInput => Some(LinearInput::Mlp),
            Site::MlpHidden => Some(LinearInput::Hidden),
            Site::FfnResidual => None,
        }
    }
}

/// A dense layer's linear weights with the input each reads, in
/// checkpoint order (q, k, v, o, gate, up, down).
pub fn linears<T>(layer: &Layer<T>) -> Vec<(&T, LinearInput)> {
    let Attention { q, k, v, o, .. } = &layer.attn;
    let mut out = vec![
        (q, LinearInput::Attention),
        (k, LinearInput::Attention),
        (v, LinearInput::Attention),
        (o, LinearInput::Heads),
    ];
    if let LayerFfn::Mlp(Mlp { gate, up, down }) = &layer.ffn {
        out.extend([
            (gate, LinearInput::Mlp),
            (up, LinearInput::Mlp),
            (down, LinearInput::Hidden),
        ]);
    }
    out
}

/// x [.., K] -> sum over every position of x x^T [K, K] (f32).
fn gram(x: &Tensor) -> Result<Tensor> {
    let k = x.dim(-1)?;
    let rows = x.reshape(&[-1, k])?.convert(DType::F32)?;
    let dims = DotDims {
        lhs_contract: vec![0],
        rhs_contract: vec![0],
        lhs_batch: vec![],
        rhs_batch: vec![],
    };
    rows.dot_general(&rows, &dims)
}

/// params (f32, checkpoint order), tokens [batch, seq] (i32) -> for layer
/// `layer` and every [`LinearInput`] in [`LinearInput::ALL`] order, the
/// Gram matrix of that input over the batch's tokens. The layers after
/// `layer` are traced but feed no output, so XLA drops them: one program
/// per layer costs its share of the forward, and returns one layer's
/// statistics (a whole 8B model's would be 32 GB). Only dense layers: an
/// MoE layer's experts see a routed subset of tokens each, which this
/// statistic does not describe.
pub fn gram_program(cfg: &ModelConfig, batch: i64, seq: i64, layer: i64) -> Result<Function> {
    if cfg.ffn != super::FfnKind::Dense {
        return Err(crate::graph::GraphError::Usage(format!(
            "calibration statistics need a dense model; this one's FFN is {:?}",
            cfg.ffn
        )));
    }
    if !(0..cfg.num_layers).contains(&layer) {
        return Err(crate::graph::GraphError::Usage(format!(
            "layer {layer} of a {}-layer model",
            cfg.num_layers
        )));
    }
    let g = Graph::new();
    let params = declare_params(&g, cfg)?;
    let tokens = g.param("tokens", TensorType::new(DType::I32, &[batch, seq]))?;
    let model = Transformer::new(cfg, &params, DType::F32)?;
    let mut grams: Vec<Tensor> = vec![];
    model.hidden_observed(&tokens, &mut |i, site, x| {
        if i == layer && LinearInput::of(site).is_some() {
            grams.push(gram(x)?);
        }
        Ok(())
    })?;
    let outs: Vec<&Tensor> = grams.iter().collect();
    Ok(g.build(&outs)?
        .with_name(&format!("calibration_grams_{layer}")))
}
