//! `experts`: routing statistics counted by hand on written-out choices,
//! the compiled router's top-k against a host recomputation in f64 from
//! the program's own router inputs (and against the balance loss of the
//! training forward), and the command end to end on a short training run
//! (files, shapes, PNGs; a dense checkpoint refused).

mod common;

use std::path::{Path, PathBuf};

use common::{client, normal, rng, sharedmoe, sharedmoe_ok};
use sharedmoe::cli::experts::{summary, write_outputs, HEIGHT, WIDTH};
use sharedmoe::graph::{DType, Graph, HostTensor, TensorType};
use sharedmoe::model::routing::{
    choices_from_outputs, outputs_per_layer, routed_layers, routing_program, ExpertPool,
    LayerChoices, RoutingStats,
};
use sharedmoe::model::{declare_params, init_params, param_specs, ModelConfig, Transformer};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sharedmoe-experts-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// Three layers, four experts, top-2, four tokens: (experts, weights) per
/// token, written out so that every number below can be counted by hand.
fn hand_written() -> Vec<LayerChoices> {
    let layer = |tokens: [([usize; 2], [f64; 2]); 4]| LayerChoices {
        experts: tokens.iter().flat_map(|t| t.0).collect(),
        weights: tokens.iter().flat_map(|t| t.1).collect(),
    };
    vec![
        layer([
            ([0, 1], [0.6, 0.4]),
            ([1, 2], [0.5, 0.5]),
            ([0, 3], [0.9, 0.1]),
            ([2, 3], [0.7, 0.3]),
        ]),
        layer([
            ([1, 0], [0.8, 0.2]),
            ([3, 0], [0.6, 0.4]),
            ([0, 1], [0.5, 0.5]),
            ([2, 1], [0.9, 0.1]),
        ]),
        layer([
            ([2, 3], [0.5, 0.5]),
            ([2, 3], [0.75, 0.25]),
            ([3, 2], [0.6, 0.4]),
            ([3, 2], [0.55, 0.45]),
        ]),
    ]
}

#[test]
fn counts_on_hand_written_choices_equal_hand_counted_values() {
    let mut s = RoutingStats::new(3, 4, 2);
    s.add(&hand_written()).unwrap();
    assert_eq!(s.tokens, 4);
    // Layer 0: e0 by tokens 0, 2; e1 by 0, 1; e2 by 1, 3; e3 by 2, 3.
    // Layer 1: e0 by 0, 1, 2; e1 by 0, 2, 3; e2 by 3; e3 by 1.
    // Layer 2: e2 and e3 by every token.
    assert_eq!(
        s.counts,
        vec![vec![2, 2, 2, 2], vec![3, 3, 1, 1], vec![0, 0, 4, 4]]
    );
    assert!(close(s.fraction(1, 0), 0.75) && close(s.fraction(2, 0), 0.0));
    // Mass: layer 0, e0: (0.6 + 0.9) / 4; e1: (0.4 + 0.5) / 4; ...
    let mass = [
        [1.5, 0.9, 1.2, 0.4],
        [1.1, 1.4, 0.9, 0.6],
        [0.0, 0.0, 2.1, 1.9],
    ];
    for (l, row) in mass.iter().enumerate() {
        for (e, m) in row.iter().enumerate() {
            assert!(
                close(s.mass(l, e), m / 4.0),
                "mass({l}, {e}) = {}",
                s.mass(l, e)
            );
        }
    }
    assert!(close(s.overall_mass(0), (1.5 + 1.1) / 12.0));
    assert!(close((0..4).map(|e| s.overall_mass(e)).sum::<f64>(), 1.0));
    assert_eq!(s.pool, ExpertPool::Shared);
    let o = s.layer_overlap().expect("a shared pool counts overlap");
    // Overlap of the same token's sets:
    //   (0, 1): {0,1}/{1,0} yes J 1; {1,2}/{3,0} no; {0,3}/{0,1} yes J 1/3; {2,3}/{2,1} yes J 1/3
    //   (0, 2): no; yes J 1/3; yes J 1/3; yes J 1
    //   (1, 2): no; {3,0}/{2,3} yes J 1/3; no; {2,1}/{3,2} yes J 1/3
    let want = [
        (0, 1, 0.75, 5.0 / 12.0),
        (0, 2, 0.75, 5.0 / 12.0),
        (1, 2, 0.5, 1.0 / 6.0),
    ];
    for (a, b, overlap, jaccard) in want {
        for (x, y) in [(a, b), (b, a)] {
            assert!(close(o.overlap(x, y), overlap), "overlap({x}, {y})");
            assert!(close(o.jaccard(x, y), jaccard), "jaccard({x}, {y})");
        }
    }
    for l in 0..3 {
        assert!(close(o.overlap(l, l), 1.0) && close(o.jaccard(l, l), 1.0));
    }
    // Against another token (partner (t + 2) mod 4): layer 0's token t
    // vs layer 2's token t+2: {0,1}/{3,2} no, {1,2}/{3,2} yes, {0,3}/{2,3}
    // yes, {2,3}/{2,3} yes.
    assert!(close(o.overlap_other_token(0, 2), 0.75));
    assert!(close(o.overlap_other_token(0, 1), 1.0));
    assert_eq!(s.ranked(1), vec![0, 1, 2, 3]);
    assert_eq!(s.ranked(2), vec![2, 3, 0, 1]);

    // A second copy of the batch doubles the counts and keeps every share.
    let mut twice = s.clone();
    twice.add(&hand_written()).unwrap();
    assert_eq!(twice.counts[1], vec![6, 6, 2, 2]);
    assert!(
        close(twice.layer_overlap().unwrap().overlap(1, 2), 0.5) && close(twice.mass(0, 0), 0.375)
    );

    // Malformed choices are refused, naming the problem.
    let mut bad = hand_written();
    bad[1].experts[2] = 4;
    let e = RoutingStats::new(3, 4, 2).add(&bad).unwrap_err();
    assert!(e.contains("layer 1, token 1: expert 4 of 4"), "{e}");
    let mut bad = hand_written();
    bad[2].experts[1] = 2;
    let e = RoutingStats::new(3, 4, 2).add(&bad).unwrap_err();
    assert!(e.contains("layer 2, token 0: expert 2 chosen twice"), "{e}");
    let e = RoutingStats::new(3, 4, 2)
        .add(&hand_written()[..2])
        .unwrap_err();
    assert!(e.contains("choices for 2 layers, expected 3"), "{e}");

    // The files: exact rows, and PNGs that decode at the documented size.
    let dir = scratch("hand");
    let files = write_outputs(&s, &dir).unwrap();
    let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap()).collect();
    assert_eq!(
        names,
        [
            "expert_counts.csv",
            "expert_heatmap.png",
            "layer_overlap.csv",
            "layer_overlap.png"
        ]
    );
    let counts = std::fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<&str> = counts.lines().collect();
    assert_eq!(lines[0], "layer,expert,count,fraction,mass");
    assert_eq!(lines.len(), 1 + 3 * 4);
    assert_eq!(lines[1 + 4], "1,0,3,0.750000,0.275000");
    assert_eq!(lines[1 + 8 + 2], "2,2,4,1.000000,0.525000");
    let overlap = std::fs::read_to_string(&files[2]).unwrap();
    let lines: Vec<&str> = overlap.lines().collect();
    assert_eq!(
        lines[0],
        "layer_a,layer_b,overlap,jaccard,overlap_other_token"
    );
    assert_eq!(lines.len(), 1 + 3 * 3);
    assert_eq!(lines[1 + 5], "1,2,0.500000,0.166667,0.500000");
    for png in [&files[1], &files[3]] {
        assert_eq!(png_size(png), (WIDTH, HEIGHT));
    }
    let text = summary(&s, 1);
    assert!(
        text.contains("layer  1: e0 75.0%, e1 75.0%, e2 25.0%"),
        "{text}"
    );
    assert!(text.contains("this model has only 3 layers"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same choices as the MoE layers 0, 2 and 5 of a per-layer model:
/// the same counts and masses, labelled with those layers, and no overlap
/// (expert e of one layer is not expert e of another).
#[test]
fn per_layer_counts_are_labelled_by_model_layer_and_count_no_overlap() {
    let mut s = RoutingStats::per_layer(vec![0, 2, 5], 4, 2);
    s.add(&hand_written()).unwrap();
    let mut shared = RoutingStats::new(3, 4, 2);
    shared.add(&hand_written()).unwrap();
    assert_eq!(s.pool, ExpertPool::PerLayer);
    assert_eq!(s.counts, shared.counts);
    assert!(close(s.mass(2, 3), 1.9 / 4.0));
    assert!(s.layer_overlap().is_none());
    let e = s.add(&hand_written()[..1]).unwrap_err();
    assert!(e.contains("choices for 1 layers, expected 3"), "{e}");

    let dir = scratch("per-layer");
    let files = write_outputs(&s, &dir).unwrap();
    let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap()).collect();
    assert_eq!(names, ["expert_counts.csv", "expert_heatmap.png"]);
    assert!(!dir.join("layer_overlap.csv").exists());
    let counts = std::fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<&str> = counts.lines().collect();
    assert_eq!(lines.len(), 1 + 3 * 4);
    assert_eq!(lines[1 + 4], "2,0,3,0.750000,0.275000");
    assert_eq!(lines[1 + 8 + 2], "5,2,4,1.000000,0.525000");
    assert_eq!(png_size(&files[1]), (WIDTH, HEIGHT));
    let text = summary(&s, 1);
    assert!(
        text.contains("4 tokens (1 batches) through 3 MoE layers with 4 experts each"),
        "{text}"
    );
    assert!(
        text.contains("layer  5: e2 100.0%, e3 100.0%, e0 0.0%") && text.contains("effective 2.0"),
        "{text}"
    );
    assert!(
        !text.contains("layers 3 and 10") && !text.contains("routing mass over all"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn png_size(path: &Path) -> (u32, u32) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert!(buf.iter().any(|&b| b != 255), "{}: blank", path.display());
    (info.width, info.height)
}

/// Four layers over one shared block of six experts, top-2.
fn small_moe() -> ModelConfig {
    ModelConfig {
        vocab_size: 40,
        hidden_size: 16,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        embedding_dim: 8,
        num_experts: 6,
        experts_per_token: 2,
        expert_intermediate_size: 8,
        moe_block_size: 4,
        ..ModelConfig::sharedmoe50m()
    }
}

const ROWS: i64 = 3;
const SEQ: i64 = 10;

/// Initial parameters, with the router scaled up so that its choices are
/// decisive (at 0.02 every probability is within 1e-3 of uniform).
fn params(cfg: &ModelConfig) -> Vec<HostTensor> {
    let mut r = rng(7);
    init_params(cfg, 3)
        .into_iter()
        .map(|(spec, v)| {
            let router = spec.name.contains("router") || spec.name.ends_with("mlp.gate.weight");
            let values: Vec<f64> = if router {
                normal(&mut r, v.len())
            } else {
                v.iter().map(|&x| x as f64).collect()
            };
            HostTensor::from_f64(&values, TensorType::new(DType::F32, &spec.dims)).unwrap()
        })
        .collect()
}

fn windows(cfg: &ModelConfig) -> HostTensor {
    let values: Vec<f64> = (0..ROWS * (SEQ + 1))
        .map(|i| ((i * 13 + 5) % cfg.vocab_size) as f64)
        .collect();
    HostTensor::from_f64(&values, TensorType::new(DType::I32, &[ROWS, SEQ + 1])).unwrap()
}

/// Runs the routing program on `cfg` and checks every traced layer's
/// probabilities, top-k and weights against softmax(W_r x) in f64 from the
/// program's own router input, W_r being `router(layer)`; the weights are
/// renormalised only when `normalize`. Returns the program's results, the
/// inputs it ran on and the host probabilities [layer][token][expert].
fn check_router_against_host(
    cfg: &ModelConfig,
    router: &dyn Fn(i64) -> String,
    normalize: bool,
) -> (Vec<HostTensor>, Vec<HostTensor>, Vec<Vec<Vec<f64>>>) {
    let layers = routed_layers(cfg);
    let (e, k, d) = (
        cfg.num_experts as usize,
        cfg.experts_per_token as usize,
        cfg.hidden_size as usize,
    );
    let n = (ROWS * SEQ) as usize;
    let params = params(cfg);
    let mut inputs = params.clone();
    inputs.push(windows(cfg));
    let program = routing_program(cfg, DType::F32, ROWS, SEQ, true)
        .unwrap()
        .compile(client())
        .unwrap();
    let outs = program.run(client(), &inputs).unwrap();
    assert_eq!(outs.len(), layers.len() * outputs_per_layer(true));
    let mut decided = 0;
    let mut host_probs = vec![];
    for (&l, out) in layers.iter().zip(outs.chunks(4)) {
        let router_index = param_specs(cfg)
            .iter()
            .position(|s| s.name == router(l))
            .unwrap_or_else(|| panic!("no tensor {}", router(l)));
        let w = params[router_index].to_f64(); // [E, D]
        let (probs, experts, weights, x) = (
            out[0].to_f64(),
            out[1].to_f64(),
            out[2].to_f64(),
            out[3].to_f64(),
        );
        assert_eq!(
            out[1].ty,
            TensorType::new(DType::I32, &[n as i64, k as i64])
        );
        assert_eq!(x.len(), n * d);
        let mut layer_probs = vec![];
        for t in 0..n {
            // p = softmax(W_r x) in f64 from the program's router input.
            let logits: Vec<f64> = (0..e)
                .map(|j| (0..d).map(|i| w[j * d + i] * x[t * d + i]).sum())
                .collect();
            let top = logits.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = logits.iter().map(|v| (v - top).exp()).sum();
            let p: Vec<f64> = logits.iter().map(|v| (v - top).exp() / z).collect();
            for j in 0..e {
                assert!(
                    (p[j] - probs[t * e + j]).abs() < 1e-5,
                    "layer {l} token {t} expert {j}: {} vs {}",
                    probs[t * e + j],
                    p[j]
                );
            }
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            // Skip near-ties among the first k + 1, where f32 rounding may
            // legitimately order them either way.
            if (0..k).all(|i| p[order[i]] - p[order[i + 1]] > 1e-5) {
                decided += 1;
                let got: Vec<usize> = experts[t * k..(t + 1) * k]
                    .iter()
                    .map(|&v| v as usize)
                    .collect();
                assert_eq!(got, order[..k].to_vec(), "layer {l} token {t}");
                let sum: f64 = if normalize {
                    order[..k].iter().map(|&j| p[j]).sum()
                } else {
                    1.0
                };
                for i in 0..k {
                    let want = p[order[i]] / sum;
                    assert!(
                        (weights[t * k + i] - want).abs() < 1e-5,
                        "layer {l} token {t}: weight {} vs {want}",
                        weights[t * k + i]
                    );
                }
            }
            layer_probs.push(p);
        }
        host_probs.push(layer_probs);
    }
    assert!(
        decided >= layers.len() * n * 9 / 10,
        "only {decided} clear choices"
    );
    (outs, inputs, host_probs)
}

#[test]
fn compiled_router_top_k_matches_a_host_recomputation_in_f64() {
    let cfg = small_moe();
    let (big_l, e, k) = (4, 6, 2);
    let n = (ROWS * SEQ) as usize;
    assert_eq!(routed_layers(&cfg), vec![0, 1, 2, 3]);
    let (outs, inputs, host_probs) =
        check_router_against_host(&cfg, &|_| "model.shared_moe.router.weight".into(), true);

    // Those choices are the training forward's: its balance loss,
    // recomputed on the host from them, equals the model's own.
    let g = Graph::new();
    let named = declare_params(&g, &cfg).unwrap();
    let win = g
        .param("windows", TensorType::new(DType::I32, &[ROWS, SEQ + 1]))
        .unwrap();
    let loss = Transformer::new(&cfg, &named, DType::F32)
        .unwrap()
        .loss(&win)
        .unwrap();
    let aux = g
        .build(&[&loss.aux])
        .unwrap()
        .compile(client())
        .unwrap()
        .run(client(), &inputs)
        .unwrap()[0]
        .to_f64()[0];
    let choices = choices_from_outputs(&outs, true);
    let mut host_aux = 0.0;
    for (l, c) in choices.iter().enumerate() {
        let mut f = vec![0.0; e];
        for &x in &c.experts {
            f[x] += 1.0 / (n * k) as f64;
        }
        let p_mean = |j: usize| host_probs[l].iter().map(|p| p[j]).sum::<f64>() / n as f64;
        host_aux += e as f64 * (0..e).map(|j| f[j] * p_mean(j)).sum::<f64>() / big_l as f64;
    }
    assert!(
        (aux - host_aux).abs() < 1e-5,
        "aux {aux} vs host {host_aux}"
    );
    // Routing is not trivially uniform here: the check has teeth.
    assert!((host_aux - 1.0).abs() > 1e-3, "aux {host_aux}");
}

/// Three layers of per-layer experts, the middle one dense
/// (`mlp_only_layers`): each MoE layer is traced with its OWN router,
/// renormalised or not as `norm_topk_prob` says, and the dense layer not
/// at all.
#[test]
fn per_layer_routers_match_a_host_recomputation_with_and_without_renormalising() {
    for normalize in [true, false] {
        let cfg = ModelConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            num_experts: 6,
            experts_per_token: 2,
            expert_intermediate_size: 8,
            moe_block_size: 4,
            mlp_only_layers: vec![1],
            norm_topk_prob: normalize,
            ..ModelConfig::qwen3_30b_a3b()
        };
        assert_eq!(routed_layers(&cfg), vec![0, 2]);
        let (outs, _, _) = check_router_against_host(
            &cfg,
            &|l| format!("model.layers.{l}.mlp.gate.weight"),
            normalize,
        );
        // Without renormalising, a token's k weights are plain
        // probabilities and sum to less than 1.
        let sums: Vec<f64> = outs[2].to_f64().chunks(2).map(|w| w.iter().sum()).collect();
        let min_sum = sums.iter().cloned().fold(f64::MAX, f64::min);
        if normalize {
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        } else {
            assert!(
                sums.iter().all(|&s| s <= 1.0 + 1e-6) && min_sum < 0.99,
                "{sums:?}"
            );
        }
    }
}

/// Rows of a CSV (header dropped), split at commas.
fn csv(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn experts_command_on_a_short_training_run_and_a_dense_checkpoint_refused() {
    let dir = scratch("e2e");
    let run_dir = dir.join("moe");
    sharedmoe_ok(&[
        "train",
        "--config",
        "configs/tiny-sharedmoe.toml",
        "--set",
        "train.steps=5",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "train.eval_every=5",
        "--set",
        &format!("run.dir=\"{}\"", run_dir.display()),
    ]);
    let ckpt = run_dir.join("checkpoints/step_00000005");
    // The run's validation batches (2 x 1 replica x 4 rows x 64 tokens),
    // written next to the checkpoints by default.
    let text = sharedmoe_ok(&["experts", "--ckpt", ckpt.to_str().unwrap()]);
    let out = run_dir.join("experts");
    let (big_l, e, k, tokens) = (2usize, 4usize, 2u64, 512u64);
    assert!(
        text.contains(&format!(
            "{tokens} tokens (2 batches) through 2 layers sharing 4 experts, top-2"
        )),
        "{text}"
    );
    assert!(
        text.contains("layer  0: e") && text.contains("layer  1: e"),
        "{text}"
    );
    assert!(text.contains("layers 3 and 10"), "{text}");
    let counts = csv(&out.join("expert_counts.csv"));
    assert_eq!(counts.len(), big_l * e);
    for l in 0..big_l {
        let rows = &counts[l * e..(l + 1) * e];
        let ids: Vec<(usize, usize)> = rows
            .iter()
            .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap()))
            .collect();
        assert_eq!(ids, (0..e).map(|x| (l, x)).collect::<Vec<_>>());
        let total: u64 = rows.iter().map(|r| r[2].parse::<u64>().unwrap()).sum();
        assert_eq!(total, tokens * k, "layer {l}: every token counted k times");
        let mass: f64 = rows.iter().map(|r| r[4].parse::<f64>().unwrap()).sum();
        assert!((mass - 1.0).abs() < 1e-4, "layer {l}: mass {mass}");
    }
    let overlap = csv(&out.join("layer_overlap.csv"));
    assert_eq!(overlap.len(), big_l * big_l);
    for r in &overlap {
        let v: f64 = r[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&v), "{r:?}");
        if r[0] == r[1] {
            assert_eq!((r[2].as_str(), r[3].as_str()), ("1.000000", "1.000000"));
        }
    }
    for png in ["expert_heatmap.png", "layer_overlap.png"] {
        assert_eq!(png_size(&out.join(png)), (WIDTH, HEIGHT), "{png}");
    }

    // --data: every document of the parquet files, at most one batch.
    let other = dir.join("data-out");
    let text = sharedmoe_ok(&[
        "experts",
        "--ckpt",
        ckpt.to_str().unwrap(),
        "--data",
        "data/fineweb-sample",
        "--batches",
        "1",
        "--out",
        other.to_str().unwrap(),
    ]);
    assert!(text.contains("256 tokens (1 batches)"), "{text}");
    assert_eq!(csv(&other.join("expert_counts.csv")).len(), big_l * e);

    // A dense checkpoint has no experts: refused, saying so.
    let dense = dir.join("dense-init");
    sharedmoe_ok(&[
        "init",
        "--config",
        "configs/tiny-dense.toml",
        "--out",
        dense.to_str().unwrap(),
    ]);
    let out = sharedmoe(&["experts", "--ckpt", dense.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a dense model") && err.contains("shared-MoE"),
        "{err}"
    );
    assert!(!dense.join("experts").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
