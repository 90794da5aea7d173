//! Experiment 2's pooled MoE: `checkpoint convert-pool` of a per-layer
//! MoE, and the conversion identity (a pool routed like the original,
//! restricted to each layer's own experts with the original routers as
//! the global router's slices, gives the original model's logits).

mod common;

use std::path::{Path, PathBuf};

use common::{normal, rng, sharedmoe, sharedmoe_ok};
use sharedmoe::ckpt::{self, Checkpoint, Purpose};
use sharedmoe::model::{param_specs, PoolScope, RouterScore};
use sharedmoe::train::Config;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-pool-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config_of(dir: &Path) -> Config {
    sharedmoe::cli::eval::checkpoint_config(dir).unwrap()
}

fn load(dir: &Path) -> Checkpoint {
    let cfg = config_of(dir);
    ckpt::load(dir, &param_specs(&cfg.model), Purpose::Weights).unwrap()
}

/// Writes `c` with run config `cfg` to `dir` (weights only).
fn save(dir: &Path, cfg: &Config, mut c: Checkpoint) {
    c.state.config_toml = cfg.to_toml();
    c.state.config_sha256 = ckpt::sha256_hex(&c.state.config_toml);
    ckpt::save(dir, &cfg.model, cfg.train.seq_len, &c).unwrap();
}

fn tensor<'a>(c: &'a Checkpoint, name: &str) -> &'a [f32] {
    &c.params
        .iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .2
}

/// Logits [B, S, V] of the checkpoint's model on fixed tokens.
fn logits(dir: &Path) -> Vec<f64> {
    let rows: Vec<Vec<i32>> = (0..3)
        .map(|r| {
            (0..17)
                .map(|i| ((i * 37 + r * 101 + 5) % 256) as i32)
                .collect()
        })
        .collect();
    let got = common::run_checkpoint_model(dir, &rows, |model, win| {
        let inputs = win.slice_axis(1, 0, win.dim(1).unwrap() - 1).unwrap();
        let (h, _) = model.hidden(&inputs).unwrap();
        vec![model.logits(&h).unwrap()]
    });
    got[0].to_f64()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// A tiny-moe (3 layers, layer 1 dense, 8 experts, top-2) with routers
/// scaled up so that every choice is decisive (initial routers are near
/// uniform and their near-ties could flip on summation order).
fn per_layer_model(dir: &Path, norm_topk_prob: bool) -> PathBuf {
    let init = dir.join("init");
    sharedmoe_ok(&[
        "init",
        "--config",
        "configs/tiny-moe.toml",
        "--set",
        &format!("model.norm_topk_prob={norm_topk_prob}"),
        "--out",
        init.to_str().unwrap(),
    ]);
    let cfg = config_of(&init);
    let mut c = load(&init);
    let mut r = rng(11);
    for (name, _, v) in &mut c.params {
        if name.ends_with("mlp.gate.weight") {
            let z = normal(&mut r, v.len());
            for (x, z) in v.iter_mut().zip(z) {
                *x = z as f32;
            }
        }
    }
    let src = dir.join("src");
    save(&src, &cfg, c);
    src
}

#[test]
fn convert_pool_merges_the_experts_and_keeps_the_rest() {
    let dir = scratch("convert");
    let src = per_layer_model(&dir, true);
    let out = dir.join("pooled");
    let text = sharedmoe_ok(&[
        "checkpoint",
        "convert-pool",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
        "--seed",
        "5",
    ]);
    assert!(
        text.contains("2 MoE layers x 8 experts -> one pool of 16 with a Sigmoid global router"),
        "{text}"
    );
    let (a, b) = (load(&src), load(&out));
    let m = config_of(&out).model;
    assert_eq!(m.num_experts, 16);
    assert_eq!(m.router_score, RouterScore::Sigmoid);
    assert_eq!(m.pool_scope, PoolScope::Global);
    let origin: Vec<[i64; 2]> = [0, 2]
        .iter()
        .flat_map(|&l| (0..8).map(move |e| [l, e]))
        .collect();
    assert_eq!(m.pool_origin, origin);
    // The pool is layer 0's experts then layer 2's, for every projection.
    for proj in ["gate_proj", "up_proj", "down_proj"] {
        let mut want = tensor(&a, &format!("model.layers.0.mlp.experts.{proj}")).to_vec();
        want.extend_from_slice(tensor(&a, &format!("model.layers.2.mlp.experts.{proj}")));
        assert!(
            tensor(&b, &format!("model.pool.experts.{proj}")) == want,
            "{proj}"
        );
    }
    // Everything else of the per-layer model is there unchanged (the
    // routers as teachers); the dense layer's MLP too.
    for (name, _, v) in &a.params {
        if !name.contains(".mlp.experts.") {
            assert!(tensor(&b, name) == &v[..], "{name}");
        }
    }
    let g = tensor(&b, "model.pool.router.weight");
    assert_eq!(g.len(), 16 * 64);
    let std = (g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / g.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.002, "global router std {std}");
    assert!(!out.join("optimizer.safetensors").exists());

    // Refusals: a written OUT is not overwritten; a model without
    // per-layer experts is not converted.
    let again = sharedmoe(&[
        "checkpoint",
        "convert-pool",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let dense = dir.join("dense");
    sharedmoe_ok(&[
        "init",
        "--config",
        "configs/tiny-dense.toml",
        "--out",
        dense.to_str().unwrap(),
    ]);
    let refused = sharedmoe(&[
        "checkpoint",
        "convert-pool",
        dense.to_str().unwrap(),
        dir.join("x").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("per-layer MoE (ffn = \"moe\")"), "{err}");
    assert!(!dir.join("x").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The conversion identity, with and without `norm_topk_prob`: softmax
/// scores, each layer restricted to its own slice of the pool, and the
/// global router's slices set to the original routers.
#[test]
fn a_pool_routed_like_the_original_reproduces_its_logits() {
    for norm in [true, false] {
        let dir = scratch(&format!("identity-{norm}"));
        let src = per_layer_model(&dir, norm);
        let pooled = dir.join("pooled");
        sharedmoe_ok(&[
            "checkpoint",
            "convert-pool",
            src.to_str().unwrap(),
            pooled.to_str().unwrap(),
            "--score",
            "softmax",
        ]);
        let mut cfg = config_of(&pooled);
        let mut c = load(&pooled);
        let teachers: Vec<f32> = [0, 2]
            .iter()
            .flat_map(|l| tensor(&c, &format!("model.layers.{l}.mlp.gate.weight")).to_vec())
            .collect();
        let at = c
            .params
            .iter()
            .position(|(n, _, _)| n == "model.pool.router.weight")
            .unwrap();
        c.params[at].2 = teachers;
        cfg.model.pool_scope = PoolScope::Layer;
        let identity = dir.join("identity");
        save(&identity, &cfg, c);
        let (want, got) = (logits(&src), logits(&identity));
        let err = max_rel(&got, &want);
        println!("norm_topk_prob {norm}: pooled vs per-layer logits, max error / max |logit| = {err:.2e}");
        assert!(err < 1e-5, "norm_topk_prob {norm}: {err}");
        // Routed over the whole pool instead, the same weights give other
        // logits: the restriction is what makes the identity.
        cfg.model.pool_scope = PoolScope::Global;
        let global = dir.join("global");
        save(&global, &cfg, load(&identity));
        let err = max_rel(&logits(&global), &want);
        assert!(err > 1e-3, "global routing changed nothing: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The distillation loss on written-out numbers: Bernoulli KL of the
/// sigmoids elementwise, then one layer's term (summed over experts,
/// averaged over tokens), against the closed form in f64 on the host.
#[test]
fn the_distillation_loss_equals_a_hand_computed_bernoulli_kl() {
    use sharedmoe::graph::{DType, Graph, TensorType};
    use sharedmoe::model::distill::{bernoulli_kl_logits, distill_term};
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    let kl = |t: f64, s: f64| {
        let (p, q) = (sig(t), sig(s));
        p * (p / q).ln() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln()
    };
    // t = 0, s = ln 3: p = 1/2, q = 3/4: 1/2 ln(2/3) + 1/2 ln 2 = ln(4/3) / 2.
    assert!((kl(0.0, 3f64.ln()) - (4.0f64 / 3.0).ln() / 2.0).abs() < 1e-15);
    let t = [0.0, 2.0, -3.0, 25.0, 1.5];
    let s = [3f64.ln(), -1.0, -3.0, 20.0, -40.0];
    let g = Graph::new();
    let ty = TensorType::new(DType::F64, &[5]);
    let out = bernoulli_kl_logits(
        &g.constant(&t, ty.clone()).unwrap(),
        &g.constant(&s, ty).unwrap(),
    )
    .unwrap();
    let got = g
        .build(&[&out])
        .unwrap()
        .compile(common::client())
        .unwrap()
        .run(common::client(), &[])
        .unwrap()[0]
        .to_f64();
    assert!(
        (got[0] - 0.143_841_036_225_890_1).abs() < 1e-12,
        "{}",
        got[0]
    );
    assert_eq!(got[2], 0.0, "equal logits, no divergence");
    for i in 0..5 {
        // Element 4 has q = sigmoid(-40) ~ 4e-18: the closed form's
        // ln(p / q) is still finite in f64.
        assert!(
            (got[i] - kl(t[i], s[i])).abs() < 1e-9 * kl(t[i], s[i]).max(1.0),
            "{i}: {} vs {}",
            got[i],
            kl(t[i], s[i])
        );
    }
    // One layer: 2 tokens x 2 features, 3 experts.
    let x = [0.5, -1.0, 2.0, 0.25];
    let teacher = [1.0, 0.0, -0.5, 2.0, 0.3, 0.3];
    let student = [0.0, 1.0, 0.5, 0.5, -1.0, 0.2];
    let g = Graph::new();
    let c = |v: &[f64], dims: &[i64]| g.constant(v, TensorType::new(DType::F64, dims)).unwrap();
    let term = distill_term(
        &c(&x, &[2, 2]),
        &c(&teacher, &[3, 2]),
        &c(&student, &[3, 2]),
    )
    .unwrap();
    let got = g
        .build(&[&term])
        .unwrap()
        .compile(common::client())
        .unwrap()
        .run(common::client(), &[])
        .unwrap()[0]
        .to_f64()[0];
    let mut want = 0.0;
    for n in 0..2 {
        for e in 0..3 {
            let dot = |w: &[f64]| x[2 * n] * w[2 * e] + x[2 * n + 1] * w[2 * e + 1];
            want += kl(dot(&teacher), dot(&student));
        }
    }
    want /= 2.0; // mean over the tokens, sum over the experts
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}

/// Stages 1 and 2 on the CLI: a per-layer tiny-moe converted, its global
/// router distilled from the original routers (everything else frozen:
/// byte-identical afterwards), then trained on next-token loss; `eval`
/// and `experts` run on the results.
#[test]
fn distillation_then_router_training_through_the_cli() {
    let dir = scratch("stages");
    let src = per_layer_model(&dir, true);
    let pooled = dir.join("pooled");
    sharedmoe_ok(&[
        "checkpoint",
        "convert-pool",
        src.to_str().unwrap(),
        pooled.to_str().unwrap(),
    ]);
    let stage = |from: &Path, name: &str, objective: &str, lr: &str| -> PathBuf {
        let run = dir.join(name);
        sharedmoe_ok(&[
            "train",
            "--config",
            from.to_str().unwrap(),
            "--init",
            from.to_str().unwrap(),
            "--set",
            &format!("train.objective=\"{objective}\""),
            "--set",
            "train.trainable=[\"model.pool.router.weight\"]",
            "--set",
            "train.steps=30",
            "--set",
            "train.warmup_steps=3",
            "--set",
            &format!("train.lr={lr}"),
            "--set",
            "train.global_batch=4",
            "--set",
            "train.checkpoint_every=30",
            "--set",
            "train.eval_every=0",
            "--set",
            &format!("run.dir=\"{}\"", run.display()),
        ]);
        run
    };
    let distill = stage(&pooled, "distill", "router_distill", "1e-1");
    let aux: Vec<f64> = std::fs::read_to_string(distill.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["aux"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let (first, last) = (aux[0], aux[aux.len() - 1]);
    println!(
        "distillation loss: step 0 {first:.4}, step {} {last:.4}",
        aux.len() - 1
    );
    assert!(
        last < first / 4.0,
        "distillation loss fell only from {first} to {last}"
    );
    let distilled = ckpt::latest(&distill).unwrap();
    let (before, after) = (load(&pooled), load(&distilled));
    for ((name, _, a), (_, _, b)) in before.params.iter().zip(&after.params) {
        if name == "model.pool.router.weight" {
            assert!(a != b, "the global router did not move");
        } else {
            assert!(a == b, "{name} is frozen but changed");
        }
    }
    let lm = ckpt::latest(&stage(&distilled, "lm", "lm", "3e-3")).unwrap();
    for c in [&src, &pooled, &distilled, &lm] {
        let text = sharedmoe_ok(&[
            "eval",
            "--ckpt",
            c.to_str().unwrap(),
            "--data",
            "data/fineweb-sample",
            "--tokenizer",
            "data/tokenizer.json",
            "--batches",
            "2",
        ]);
        assert!(text.contains("cross-entropy"), "{text}");
    }
    let out = dir.join("experts");
    let text = sharedmoe_ok(&[
        "experts",
        "--ckpt",
        lm.to_str().unwrap(),
        "--data",
        "data/fineweb-sample",
        "--tokenizer",
        "data/tokenizer.json",
        "--batches",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        text.contains("through 2 layers sharing 16 experts"),
        "{text}"
    );
    // One pool used at layers 0 and 2: their overlap is counted.
    let overlap = std::fs::read_to_string(out.join("layer_overlap.csv")).unwrap();
    assert!(overlap.lines().any(|l| l.starts_with("0,2,")), "{overlap}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The checkpoint's parameters and fixed windows [3, 17] as program
/// inputs.
fn program_inputs(c: &Checkpoint) -> Vec<sharedmoe::graph::HostTensor> {
    let rows: Vec<Vec<i32>> = (0..3)
        .map(|r| {
            (0..17)
                .map(|i| (((r * 17 + i) * 29 + 7) % 256) as i32)
                .collect()
        })
        .collect();
    common::checkpoint_inputs(c, &rows)
}

/// REAP saliency from the program against a host recomputation in f64:
/// each chosen expert's SwiGLU output on its token from the checkpoint's
/// weights, its norm times the routing weight, averaged over the tokens
/// routed to the expert. Per layer on the per-layer model; over both
/// layers together on its pool.
#[test]
fn reap_saliency_equals_a_host_computation_over_the_routed_tokens() {
    use sharedmoe::graph::DType;
    use sharedmoe::model::reap::{reap_program, ReapStats};
    use sharedmoe::model::routing::routing_program;
    let dir = scratch("reap");
    let src = per_layer_model(&dir, true);
    let pooled = dir.join("pooled");
    sharedmoe_ok(&[
        "checkpoint",
        "convert-pool",
        src.to_str().unwrap(),
        pooled.to_str().unwrap(),
    ]);
    for ckpt in [&src, &pooled] {
        let cfg = config_of(ckpt).model;
        let c = load(ckpt);
        let inputs = program_inputs(&c);
        let run = |f: sharedmoe::graph::Function| {
            f.compile(common::client())
                .unwrap()
                .run(common::client(), &inputs)
                .unwrap()
        };
        let mut stats = ReapStats::new(&cfg);
        stats
            .add(&run(reap_program(&cfg, DType::F32, 3, 16).unwrap()))
            .unwrap();
        let routing = run(routing_program(&cfg, DType::F32, 3, 16, true).unwrap());
        let (e, k, d, f) = (cfg.num_experts as usize, 2, 64, 32);
        let pool = cfg.ffn == sharedmoe::model::FfnKind::PooledMoe;
        // [unit][expert] sums and counts on the host; unit = layer row, or
        // 0 for the pool.
        let units = if pool { 1 } else { 2 };
        let mut sum = vec![vec![0.0; e]; units];
        let mut count = vec![vec![0u64; e]; units];
        let mut all_token_sum = vec![vec![0.0; e]; units];
        for (row, (l, r)) in [0, 2].iter().zip(routing.chunks(4)).enumerate() {
            let (ids, w, x) = (r[1].to_f64(), r[2].to_f64(), r[3].to_f64());
            let proj = |p: &str| -> Vec<f64> {
                let name = if pool {
                    format!("model.pool.experts.{p}")
                } else {
                    format!("model.layers.{l}.mlp.experts.{p}")
                };
                tensor(&c, &name).iter().map(|&v| v as f64).collect()
            };
            let (gate, up, down) = (proj("gate_proj"), proj("up_proj"), proj("down_proj"));
            let u = if pool { 0 } else { row };
            for t in 0..ids.len() / k {
                let xt = &x[t * d..(t + 1) * d];
                for j in 0..k {
                    let ex = ids[t * k + j] as usize;
                    let h: Vec<f64> = (0..f)
                        .map(|i| {
                            let dot = |m: &[f64]| -> f64 {
                                (0..d).map(|c| m[(ex * f + i) * d + c] * xt[c]).sum()
                            };
                            let a = dot(&gate);
                            a / (1.0 + (-a).exp()) * dot(&up)
                        })
                        .collect();
                    let norm = (0..d)
                        .map(|o| {
                            (0..f)
                                .map(|i| down[(ex * d + o) * f + i] * h[i])
                                .sum::<f64>()
                        })
                        .map(|y| y * y)
                        .sum::<f64>()
                        .sqrt();
                    sum[u][ex] += w[t * k + j] * norm;
                    count[u][ex] += 1;
                    all_token_sum[u][ex] += w[t * k + j] * norm;
                }
            }
        }
        let got = stats.units();
        assert_eq!(got.len(), units * e);
        let tokens = 3.0 * 16.0;
        let mut differs_from_all_token_mean = false;
        for (i, unit) in got.iter().enumerate() {
            let (u, ex) = (i / e, i % e);
            assert_eq!(unit.frequency, count[u][ex], "{unit:?}");
            let want = if count[u][ex] == 0 {
                0.0
            } else {
                sum[u][ex] / count[u][ex] as f64
            };
            assert!(
                (unit.reap - want).abs() < 1e-4 * want.max(1e-3),
                "{unit:?}: {} vs {want}",
                unit.reap
            );
            let per_layers = if pool { 2.0 } else { 1.0 };
            let all_token = all_token_sum[u][ex] / (tokens * per_layers);
            differs_from_all_token_mean |=
                count[u][ex] > 0 && (unit.reap - all_token).abs() > 1e-3 * want;
        }
        assert!(
            differs_from_all_token_mean,
            "the routed-token mean is the all-token mean here"
        );
        let expected_layer = if pool { None } else { Some(0) };
        assert_eq!(got[0].layer, expected_layer);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `reap` then `checkpoint prune` on the pool (by REAP) and on the
/// per-layer model (by frequency, the same count in each layer): exactly
/// the highest-ranked experts stay, with their router rows; the pruned
/// checkpoints evaluate, train and resume; keeping fewer than top-k is
/// refused.
#[test]
fn pruning_keeps_the_highest_ranked_experts_and_the_result_trains_and_resumes() {
    let dir = scratch("prune");
    let src = per_layer_model(&dir, true);
    let pooled = dir.join("pooled");
    sharedmoe_ok(&[
        "checkpoint",
        "convert-pool",
        src.to_str().unwrap(),
        pooled.to_str().unwrap(),
    ]);
    for (ckpt, by) in [(&pooled, "reap"), (&src, "frequency")] {
        let stats = dir.join(format!("{by}.json"));
        sharedmoe_ok(&[
            "reap",
            "--ckpt",
            ckpt.to_str().unwrap(),
            "--data",
            "data/fineweb-sample",
            "--tokenizer",
            "data/tokenizer.json",
            "--batches",
            "1",
            "--out",
            stats.to_str().unwrap(),
        ]);
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        let out = dir.join(format!("pruned-{by}"));
        let text = sharedmoe_ok(&[
            "checkpoint",
            "prune",
            "--ckpt",
            ckpt.to_str().unwrap(),
            "--stats",
            stats.to_str().unwrap(),
            "--remove-fraction",
            "0.5",
            "--by",
            by,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(text.contains("prune: kept"), "{text}");
        let (before, after, cfg) = (load(ckpt), load(&out), config_of(&out).model);
        // The expected survivors from the statistics, ranked here.
        let units = file["units"].as_array().unwrap();
        let groups: Vec<Vec<&serde_json::Value>> = if by == "reap" {
            vec![units.iter().collect()]
        } else {
            [0, 2]
                .iter()
                .map(|&l| units.iter().filter(|u| u["layer"] == l).collect())
                .collect()
        };
        let keep: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| {
                let mut ranked: Vec<(usize, f64)> = g
                    .iter()
                    .map(|u| {
                        (
                            u["expert"].as_u64().unwrap() as usize,
                            u[by].as_f64().unwrap(),
                        )
                    })
                    .collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut k: Vec<usize> = ranked[..ranked.len() / 2].iter().map(|r| r.0).collect();
                k.sort();
                k
            })
            .collect();
        let rows_of = |v: &[f32], n: usize, keep: &[usize]| -> Vec<f32> {
            let row = v.len() / n;
            keep.iter()
                .flat_map(|&e| v[e * row..(e + 1) * row].to_vec())
                .collect()
        };
        if by == "reap" {
            assert_eq!(cfg.num_experts, 8);
            for name in [
                "model.pool.router.weight",
                "model.pool.experts.gate_proj",
                "model.pool.experts.up_proj",
                "model.pool.experts.down_proj",
            ] {
                assert!(
                    tensor(&after, name) == rows_of(tensor(&before, name), 16, &keep[0]),
                    "{name}"
                );
            }
            let origin = config_of(ckpt).model.pool_origin;
            assert_eq!(
                cfg.pool_origin,
                keep[0].iter().map(|&j| origin[j]).collect::<Vec<_>>()
            );
            let teacher = "model.layers.2.mlp.gate.weight";
            assert!(
                tensor(&after, teacher) == tensor(&before, teacher),
                "teachers stay whole"
            );
        } else {
            assert_eq!(cfg.num_experts, 4);
            for (i, l) in [0, 2].iter().enumerate() {
                for p in ["gate.weight", "experts.gate_proj", "experts.down_proj"] {
                    let name = format!("model.layers.{l}.mlp.{p}");
                    assert!(
                        tensor(&after, &name) == rows_of(tensor(&before, &name), 8, &keep[i]),
                        "{name}"
                    );
                }
            }
        }
        let text = sharedmoe_ok(&[
            "eval",
            "--ckpt",
            out.to_str().unwrap(),
            "--data",
            "data/fineweb-sample",
            "--tokenizer",
            "data/tokenizer.json",
            "--batches",
            "1",
        ]);
        assert!(text.contains("cross-entropy"), "{text}");
        // Train 4 steps in two runs: 2, then resume to 4.
        let run = dir.join(format!("run-{by}"));
        let train = |extra: &[&str]| {
            let mut args = vec![
                "train",
                "--config",
                out.to_str().unwrap(),
                "--set",
                "train.steps=4",
                "--set",
                "train.warmup_steps=1",
                "--set",
                "train.global_batch=4",
                "--set",
                "train.checkpoint_every=2",
                "--set",
                "train.eval_every=0",
            ];
            let run_dir = format!("run.dir=\"{}\"", run.display());
            args.extend(["--set", run_dir.as_str()]);
            args.extend(extra);
            sharedmoe_ok(&args);
        };
        train(&["--init", out.to_str().unwrap(), "--until-step", "2"]);
        train(&[
            "--resume",
            run.join("checkpoints/step_00000002").to_str().unwrap(),
        ]);
        assert!(run.join("checkpoints/step_00000004").exists());
    }
    // Fewer experts than each token chooses: refused, nothing written.
    let refused = sharedmoe(&[
        "checkpoint",
        "prune",
        "--ckpt",
        src.to_str().unwrap(),
        "--stats",
        dir.join("frequency.json").to_str().unwrap(),
        "--keep-fraction",
        "0.1",
        "--out",
        dir.join("too-few").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("fewer than the 2 each token chooses"), "{err}");
    assert!(!dir.join("too-few").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
