//! The two models on small configs: the full loss gradient against finite
//! differences in f64, routed vs dense experts, the balance loss, and the
//! exact parameter counts of SPEC.md.

mod common;

use common::{client, normal, rng};
use sharedmoe::graph::{grad, DType, Graph, HostTensor, Tensor, TensorType};
use sharedmoe::model::params::{Mlp, Moe};
use sharedmoe::model::{
    init_params, param_specs, ExpertCompute, FfnKind, ModelConfig, Params, RouterScore, Transformer,
};
use sharedmoe::train::config::Objective;

/// Small enough for finite differences, large enough to exercise GQA,
/// RoPE, factorised embeddings and multi-block routing.
fn small(ffn: FfnKind) -> ModelConfig {
    if ffn == FfnKind::Moe {
        // Qwen3-MoE in miniature: layer 1 dense, head_dim 6 against
        // hidden / heads = 4, qk-norm, an untied head; a balance
        // coefficient large enough for its gradient to show.
        return ModelConfig {
            vocab_size: 24,
            hidden_size: 16,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 6,
            intermediate_size: 12,
            num_experts: 4,
            experts_per_token: 2,
            expert_intermediate_size: 8,
            moe_block_size: 4,
            aux_loss_coef: 0.5,
            rope_theta: 10_000.0,
            mlp_only_layers: vec![1],
            ..ModelConfig::qwen3_30b_a3b()
        };
    }
    let base = if ffn == FfnKind::Dense {
        ModelConfig::dense125m()
    } else {
        ModelConfig::sharedmoe50m()
    };
    ModelConfig {
        vocab_size: 24,
        hidden_size: 16,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: if ffn == FfnKind::Dense { 4 } else { 2 },
        intermediate_size: if ffn == FfnKind::Dense { 12 } else { 0 },
        embedding_dim: if ffn == FfnKind::Dense { 0 } else { 6 },
        num_experts: if ffn == FfnKind::Dense { 0 } else { 4 },
        expert_intermediate_size: if ffn == FfnKind::Dense { 0 } else { 8 },
        moe_block_size: 4,
        ..base
    }
}

const BATCH: i64 = 2;
const SEQ: i64 = 6;

fn windows(cfg: &ModelConfig) -> Vec<f64> {
    (0..BATCH * (SEQ + 1))
        .map(|i| ((i * 7 + 3) % cfg.vocab_size) as f64)
        .collect()
}

/// Traces (loss, ce, aux, grads...) of the model over f64 parameters.
fn loss_and_grads(
    cfg: &ModelConfig,
    experts: ExpertCompute,
) -> (sharedmoe::graph::Compiled, Vec<TensorType>) {
    objective_and_grads(cfg, experts, Objective::Lm)
}

/// [`loss_and_grads`] of `objective`.
fn objective_and_grads(
    cfg: &ModelConfig,
    experts: ExpertCompute,
    objective: Objective,
) -> (sharedmoe::graph::Compiled, Vec<TensorType>) {
    let g = Graph::new();
    let params = Params::spec(cfg)
        .try_map(|s| g.param(&s.name, TensorType::new(DType::F64, &s.dims)))
        .unwrap();
    let win = g
        .param("windows", TensorType::new(DType::I32, &[BATCH, SEQ + 1]))
        .unwrap();
    let model = Transformer::new(cfg, &params, DType::F64)
        .unwrap()
        .with_expert_compute(experts);
    let loss = match objective {
        Objective::Lm => model.loss(&win).unwrap(),
        Objective::RouterDistill => model
            .with_teacher_routing()
            .unwrap()
            .distill_loss(&win)
            .unwrap(),
    };
    let refs: Vec<&Tensor> = params.leaves();
    let grads = grad(&loss.total, &refs).unwrap();
    let mut outs = vec![&loss.total, &loss.ce, &loss.aux];
    outs.extend(grads.iter());
    let f = g.build(&outs).unwrap();
    let types = f.param_types();
    (f.compile(client()).unwrap(), types)
}

fn run(
    step: &sharedmoe::graph::Compiled,
    types: &[TensorType],
    values: &[Vec<f64>],
) -> Vec<Vec<f64>> {
    let host: Vec<HostTensor> = types
        .iter()
        .zip(values)
        .map(|(t, v)| HostTensor::from_f64(v, t.clone()).unwrap())
        .collect();
    step.run(client(), &host)
        .unwrap()
        .iter()
        .map(|h| h.to_f64())
        .collect()
}

fn initial_values(cfg: &ModelConfig, seed: u64) -> Vec<Vec<f64>> {
    let mut v: Vec<Vec<f64>> = init_params(cfg, seed)
        .into_iter()
        .map(|(_, x)| x.iter().map(|&a| a as f64 * 5.0).collect())
        .collect();
    // Gains away from 1 so their gradients are not special.
    for (s, vals) in param_specs(cfg).iter().zip(v.iter_mut()) {
        if s.dims.len() == 1 {
            *vals = normal(&mut rng(seed + vals.len() as u64), vals.len())
                .iter()
                .map(|x| 1.0 + 0.2 * x)
                .collect();
        }
    }
    v.push(windows(cfg));
    v
}

/// For every parameter tensor, the directional derivative along a random
/// direction confined to that tensor must match central differences.
fn check_full_model_gradient(ffn: FfnKind) {
    check_model_gradient(small(ffn));
}

fn check_model_gradient(cfg: ModelConfig) {
    check_objective_gradient(cfg, Objective::Lm);
}

fn check_objective_gradient(cfg: ModelConfig, objective: Objective) {
    let ffn = cfg.ffn;
    cfg.validate().unwrap();
    let (step, types) = objective_and_grads(
        &cfg,
        ExpertCompute::Routed {
            block: cfg.moe_block_size,
        },
        objective,
    );
    let x = initial_values(&cfg, 3);
    let base = run(&step, &types, &x);
    let n_params = types.len() - 1;
    // The per-layer MoE's routing has steeper second-order terms where a
    // token's top-k is nearly tied: at h = 1e-5 one tensor (layer 1's
    // k_proj, feeding layer 2's router) differs by 9e-6 relative from
    // central differences, at h = 1e-6 and 3e-7 every tensor is within
    // 1e-6, so the gradient is right and the step is the truncation.
    let h = if matches!(ffn, FfnKind::Moe | FfnKind::PooledMoe) {
        1e-6
    } else {
        1e-5
    };
    let mut worst: f64 = 0.0;
    for p in 0..n_params {
        let dir = normal(&mut rng(100 + p as u64), x[p].len());
        let analytic: f64 = base[3 + p].iter().zip(&dir).map(|(g, d)| g * d).sum();
        let shifted = |sign: f64| {
            let mut y = x.clone();
            for (v, d) in y[p].iter_mut().zip(&dir) {
                *v += sign * h * d;
            }
            run(&step, &types, &y)[0][0]
        };
        let fd = (shifted(1.0) - shifted(-1.0)) / (2.0 * h);
        let rel = (fd - analytic).abs() / fd.abs().max(1e-8);
        assert!(
            rel < 1e-6,
            "{:?} `{}`: fd {fd:.12e} vs ad {analytic:.12e} (rel {rel:.2e})",
            ffn,
            param_specs(&cfg)[p].name
        );
        worst = worst.max(rel);
    }
    println!(
        "{ffn:?}: worst relative error over {n_params} tensors: {worst:.2e}; loss {:.6}",
        base[0][0]
    );
}

#[test]
fn dense_model_gradient_matches_finite_differences() {
    check_full_model_gradient(FfnKind::Dense);
}

#[test]
fn shared_moe_model_gradient_matches_finite_differences() {
    check_full_model_gradient(FfnKind::SharedMoe);
}

#[test]
fn per_layer_moe_model_gradient_matches_finite_differences() {
    check_full_model_gradient(FfnKind::Moe);
}

/// Qwen3's `norm_topk_prob = false`: the chosen experts' weights are the
/// plain softmax probabilities.
#[test]
fn per_layer_moe_without_top_k_normalisation_gradient_matches_finite_differences() {
    check_model_gradient(ModelConfig {
        norm_topk_prob: false,
        ..small(FfnKind::Moe)
    });
}

/// The pooled MoE of `small(Moe)` (`checkpoint convert-pool`): 8 pool
/// experts from layers 0 and 2, the given scores.
fn small_pooled(score: RouterScore) -> ModelConfig {
    sharedmoe::ckpt::pool::pooled_model(&small(FfnKind::Moe), score).unwrap()
}

/// The pooled MoE's LM loss with sigmoid scores over the whole pool.
#[test]
fn pooled_moe_model_gradient_matches_finite_differences() {
    check_model_gradient(small_pooled(RouterScore::Sigmoid));
}

/// The router-distillation objective, through every tensor it reaches:
/// the global router directly, and through the layers' router inputs
/// everything below them (teachers, attention, the pool, norms).
#[test]
fn router_distillation_gradient_matches_finite_differences() {
    check_objective_gradient(small_pooled(RouterScore::Sigmoid), Objective::RouterDistill);
}

#[test]
fn routed_and_dense_experts_agree() {
    for ffn in [FfnKind::SharedMoe, FfnKind::Moe] {
        routed_and_dense_experts_agree_for(ffn);
    }
}

fn routed_and_dense_experts_agree_for(ffn: FfnKind) {
    let cfg = small(ffn);
    let x = initial_values(&cfg, 5);
    let (routed, types) = loss_and_grads(&cfg, ExpertCompute::Routed { block: 4 });
    let (dense, _) = loss_and_grads(&cfg, ExpertCompute::Dense);
    let (a, b) = (run(&routed, &types, &x), run(&dense, &types, &x));
    for (i, (ra, rb)) in a.iter().zip(&b).enumerate() {
        common::assert_close(ra, rb, 1e-12, &format!("output {i}"));
    }
    // A block as large as all assignments (one block per expert) too.
    let (big, _) = loss_and_grads(&cfg, ExpertCompute::Routed { block: 64 });
    common::assert_close(
        &run(&big, &types, &x)[0],
        &a[0],
        1e-12,
        "loss with block 64",
    );
}

#[test]
fn initial_loss_is_near_uniform_cross_entropy() {
    for ffn in [FfnKind::Dense, FfnKind::SharedMoe] {
        let cfg = small(ffn);
        let (step, types) = loss_and_grads(&cfg, ExpertCompute::Routed { block: 4 });
        let mut x: Vec<Vec<f64>> = init_params(&cfg, 1)
            .into_iter()
            .map(|(_, v)| v.iter().map(|&a| a as f64).collect())
            .collect();
        x.push(windows(&cfg));
        let out = run(&step, &types, &x);
        let uniform = (cfg.vocab_size as f64).ln();
        assert!(
            (out[1][0] - uniform).abs() < 0.05,
            "{ffn:?}: initial CE {} vs ln V {uniform}",
            out[1][0]
        );
    }
}

#[test]
fn balance_loss_is_exactly_one_for_a_zero_router() {
    let cfg = small(FfnKind::SharedMoe);
    let (step, types) = loss_and_grads(&cfg, ExpertCompute::Routed { block: 4 });
    let mut x = initial_values(&cfg, 9);
    let router = param_specs(&cfg)
        .iter()
        .position(|s| s.name == "model.shared_moe.router.weight")
        .unwrap();
    x[router] = vec![0.0; x[router].len()];
    let out = run(&step, &types, &x);
    assert_eq!(out[2][0], 1.0, "aux (mean over layers) with a zero router");
    // And per application, in f32, through the layer API itself.
    let g = Graph::new();
    let xs = g
        .param("x", TensorType::new(DType::F32, &[10, 16]))
        .unwrap();
    let zero_router = g.zeros(TensorType::new(DType::F32, &[4, 16])).unwrap();
    let gate = g
        .param("gate", TensorType::new(DType::F32, &[4, 8, 16]))
        .unwrap();
    let up = g
        .param("up", TensorType::new(DType::F32, &[4, 8, 16]))
        .unwrap();
    let down = g
        .param("down", TensorType::new(DType::F32, &[4, 16, 8]))
        .unwrap();
    let w = Moe {
        router: zero_router.clone(),
        experts: Mlp {
            gate: gate.clone(),
            up: up.clone(),
            down: down.clone(),
        },
    };
    let (_, aux) =
        sharedmoe::model::moe::shared_moe(&xs, &w, 2, ExpertCompute::Routed { block: 4 }).unwrap();
    let f = g.build(&[&aux]).unwrap().compile(client()).unwrap();
    let ins = vec![
        HostTensor::from_f64(
            &normal(&mut rng(1), 160),
            TensorType::new(DType::F32, &[10, 16]),
        )
        .unwrap(),
        HostTensor::from_f64(&[0.1], TensorType::new(DType::F32, &[4, 8, 16])).unwrap(),
        HostTensor::from_f64(&[0.1], TensorType::new(DType::F32, &[4, 8, 16])).unwrap(),
        HostTensor::from_f64(&[0.1], TensorType::new(DType::F32, &[4, 16, 8])).unwrap(),
    ];
    assert_eq!(f.run(client(), &ins).unwrap()[0].to_f64(), vec![1.0]);
}

#[test]
fn small_preset_parameter_counts_keep_the_full_models_ratio() {
    let dense = sharedmoe::model::count_params(&ModelConfig::preset("small-dense").unwrap());
    let moe = sharedmoe::model::count_params(&ModelConfig::preset("small-sharedmoe").unwrap());
    assert_eq!((dense, moe), (8_655_552, 3_114_688));
    // Thesis (SPEC.md): 137,841,408 / 49,642,240 = 2.78; within 10%.
    let full = 137_841_408.0 / 49_642_240.0;
    let ratio = dense as f64 / moe as f64;
    assert!(
        (ratio / full - 1.0).abs() < 0.10,
        "dense / shared-MoE parameters {ratio:.3}, the full models' {full:.3}"
    );
    // The architecture the ratio comes from, as the full models have it.
    let m = ModelConfig::preset("small-sharedmoe").unwrap();
    assert_eq!(
        (
            m.num_layers,
            m.num_experts,
            m.experts_per_token,
            m.aux_loss_coef
        ),
        (12, 16, 2, 0.01)
    );
    assert_eq!(m.num_heads / m.num_kv_heads, 3, "GQA 3:1");
    assert_eq!(m.hidden_size / m.embedding_dim, 6, "e/d = 1/6");
    assert_eq!(
        m.expert_intermediate_size * 16,
        m.hidden_size * 15,
        "0.9375 d"
    );
    let d = ModelConfig::preset("small-dense").unwrap();
    assert_eq!(d.intermediate_size, 4 * d.hidden_size);
}

#[test]
fn full_size_parameter_counts() {
    assert_eq!(
        sharedmoe::model::count_params(&ModelConfig::dense125m()),
        137_841_408
    );
    assert_eq!(
        sharedmoe::model::count_params(&ModelConfig::sharedmoe50m()),
        49_642_240
    );
}

/// Temporaries (bytes, XLA's buffer assignment) of one shared-MoE
/// application's forward and backward: N tokens [N, D] through E experts
/// of size F, top-2, routed in blocks of 8; the outputs are the gradients
/// of x and of every weight.
fn routed_moe_temporaries(n: i64, d: i64, f: i64, e: i64) -> i64 {
    let g = Graph::new();
    let t = |dims: &[i64]| TensorType::new(DType::F32, dims);
    let x = g.param("x", t(&[n, d])).unwrap();
    let router = g.param("router", t(&[e, d])).unwrap();
    let gate = g.param("gate", t(&[e, f, d])).unwrap();
    let up = g.param("up", t(&[e, f, d])).unwrap();
    let down = g.param("down", t(&[e, d, f])).unwrap();
    let w = Moe {
        router: router.clone(),
        experts: Mlp {
            gate: gate.clone(),
            up: up.clone(),
            down: down.clone(),
        },
    };
    let (y, aux) =
        sharedmoe::model::moe::shared_moe(&x, &w, 2, ExpertCompute::Routed { block: 8 }).unwrap();
    let loss = y.sin().unwrap().sum_all().unwrap().add(&aux).unwrap();
    let grads = grad(&loss, &[&x, &router, &gate, &up, &down]).unwrap();
    let outs: Vec<&Tensor> = std::iter::once(&loss).chain(grads.iter()).collect();
    let f = g.build(&outs).unwrap().compile(client()).unwrap();
    f.executable()
        .memory_stats()
        .expect("the CPU plugin reports compiled memory")
        .temporaries
}

#[test]
fn routed_moe_memory_does_not_grow_with_blocks_times_expert_size() {
    // What makes the routed MoE's memory flat: no block ever holds a copy
    // of its expert's weights, forward or backward. Doubling the experts
    // at a fixed number of tokens adds E blocks of padding; were each
    // block's weights gathered (the batched-dot formulation), the
    // temporaries would grow by the size of all the added experts (measured
    // with that formulation planted: 1.00x, and 6.8 MB -> 9.9 MB in all).
    // What may grow: the padding rows' activations, and one scratch
    // accumulator of one projection's weight gradient [E, F, D] (XLA keeps
    // a while loop's result in its own buffer and copies it to the output;
    // the three loops reuse one), a third of the added experts' size.
    let (n, d, f, e) = (32, 128, 256, 8);
    let small = routed_moe_temporaries(n, d, f, e);
    let large = routed_moe_temporaries(n, d, f, 2 * e);
    let added_weights = e * 3 * f * d * 4;
    let growth = large - small;
    println!(
        "temporaries: {small} B at E = {e}, {large} B at E = {}; added expert weights {added_weights} B",
        2 * e
    );
    assert!(
        (growth as f64) < 0.5 * added_weights as f64,
        "temporaries grew by {growth} B when the experts doubled (from {small} to {large} B), \
         {:.2} of the added experts' size: per-block weight copies?",
        growth as f64 / added_weights as f64
    );
    // And in absolute terms: well under one set of per-block copies. At
    // E = 16 the 64 assignments pad to 184 rows, 23 blocks of 8.
    let per_block_copies = 23 * 3 * f * d * 4;
    assert!(
        (large as f64) < 0.5 * per_block_copies as f64,
        "{large} B of temporaries at E = {}, {:.2} of the {per_block_copies} B that per-block \
         copies of the weights take",
        2 * e,
        large as f64 / per_block_copies as f64
    );
}
