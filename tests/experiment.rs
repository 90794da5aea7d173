//! `experiment exp1` at a small scale end to end (both models, the plots,
//! summary.md, TensorBoard events), then `eval` on its checkpoints equals
//! the validation loss logged during training, and `checkpoint inspect`
//! reads them.

mod common;

use common::sharedmoe_ok;

#[test]
fn exp1_writes_both_runs_plots_and_summary_and_eval_matches_training() {
    let dir = std::env::temp_dir().join(format!("sharedmoe-exp1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    sharedmoe_ok(&[
        "experiment",
        "exp1",
        "--scale",
        "tiny",
        "--out",
        out,
        "--set",
        "train.steps=20",
        "--set",
        "train.warmup_steps=2",
        "--set",
        "train.eval_every=10",
        "--set",
        "train.checkpoint_every=10",
    ]);
    for f in ["loss_train.png", "loss_val.png", "summary.md"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    for needle in [
        "| dense | 0 | 2130240 |",
        "| sharedmoe | 0 | 562752 |",
        "20480",
        "| dense baseline: parameters | 125M (137,841,408) | 2,130,240 |",
        "This run cannot decide the thesis's claim: with one seed",
    ] {
        assert!(summary.contains(needle), "`{needle}` not in:\n{summary}");
    }
    for model in ["dense", "sharedmoe"] {
        let run_dir = dir.join(format!("{model}-seed0"));
        let tb: Vec<_> = std::fs::read_dir(run_dir.join("tensorboard"))
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents.")
            })
            .collect();
        assert_eq!(tb.len(), 1, "{model}: one TensorBoard event file");
        // The val_loss logged after step 20 (the row of step index 19).
        let logged = std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["step"] == 19)
            .and_then(|v| v["val_loss"].as_f64())
            .expect("a validation loss at step 20");
        let ckpt = run_dir.join("checkpoints/step_00000020");
        let text = sharedmoe_ok(&["eval", "--ckpt", ckpt.to_str().unwrap()]);
        let ce: f64 = text
            .split("cross-entropy ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("eval printed: {text}"));
        assert!(
            (ce - logged).abs() < 1e-4,
            "{model}: eval {ce} vs logged {logged}"
        );
        let inspect = sharedmoe_ok(&["checkpoint", "inspect", ckpt.to_str().unwrap()]);
        assert!(inspect.contains("step 20"), "{inspect}");
        assert!(inspect.contains("model.norm.weight"), "{inspect}");
        assert!(inspect.contains("shard 0:"), "{inspect}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--scale small` with its real configs (12 layers, 16 experts, the
/// 8,192-token tokenizer on the shipped text), 2 seeds, each model as a
/// 2-process job (`--workers 2`: a coordinator and two workers on
/// 127.0.0.1), for a few steps of smaller batches: both models per seed,
/// the experts analysis of each shared-MoE run, and every section of
/// summary.md.
#[test]
fn exp1_small_runs_two_seeds_and_reports_against_the_thesis() {
    let dir = std::env::temp_dir().join(format!("sharedmoe-exp1-small-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let mut args = vec![
        "experiment",
        "exp1",
        "--scale",
        "small",
        "--workers",
        "2",
        "--out",
        out,
    ];
    for set in [
        "train.steps=3",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "train.eval_batches=1",
        "train.micro_batch=4",
        "train.global_batch=4",
    ] {
        args.extend(["--set", set]);
    }
    let printed = sharedmoe_ok(&args);
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(printed.contains(&summary[..200]), "summary printed");
    for needle in [
        "# Experiment 1 (small scale)",
        "2 seed(s)",
        "| dense baseline: parameters | 125M (137,841,408) | 8,655,552 |",
        "| shared MoE: parameters | 50M (49,642,240) | 3,114,688 |",
        "| parameter ratio dense / shared MoE | 2.78 | 2.78 |",
        "| shared MoE: final loss | 3.15 |",
        "(mean of 2; spread ",
        "per seed: ",
        "| tokens seen, per model | 6.29B (12,000 x 512 x 1,024) | 3072 / 3072 |",
        "2 replica(s)",
        "| dense | 1 | 8655552 |",
        "| sharedmoe | 1 | 3114688 |",
        "![experts per layer](sharedmoe-seed0/experts/expert_heatmap.png)",
        "![layer overlap](sharedmoe-seed0/experts/layer_overlap.png)",
        "experts used, seed 0 | effective experts, seed 0 | experts used, seed 1 |",
        "layers 3 and 10 (from 0): ",
    ] {
        assert!(summary.contains(needle), "`{needle}` not in:\n{summary}");
    }
    // The verdict: exactly one of the three, from the numbers.
    let verdicts = [
        "supports the thesis's claim",
        "contradicts the thesis's claim",
    ]
    .iter()
    .filter(|v| summary.contains(*v))
    .count();
    assert_eq!(verdicts, 1, "{summary}");
    // A row per layer in the experts table.
    assert!(summary.contains("\n| 11 | "), "{summary}");
    for f in ["loss_train.png", "loss_val.png"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let first_loss = |run: &str| -> f64 {
        let text = std::fs::read_to_string(dir.join(run).join("metrics.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        row["loss"].as_f64().unwrap()
    };
    // Seeds draw different initial weights (and batches).
    assert_ne!(first_loss("dense-seed0"), first_loss("dense-seed1"));
    for seed in 0..2 {
        let experts = dir.join(format!("sharedmoe-seed{seed}/experts"));
        for f in [
            "expert_heatmap.png",
            "layer_overlap.png",
            "expert_counts.csv",
            "layer_overlap.csv",
        ] {
            assert!(experts.join(f).is_file(), "seed {seed}: {f} missing");
        }
        let ckpt = dir.join(format!("dense-seed{seed}/checkpoints/step_00000003"));
        assert!(ckpt.is_dir(), "{} missing", ckpt.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Width and height of a PNG file (its IHDR chunk).
fn png_size(path: &std::path::Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: not a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

fn load_ckpt(dir: &std::path::Path) -> sharedmoe::ckpt::Checkpoint {
    let cfg = sharedmoe::cli::eval::checkpoint_config(dir).unwrap();
    sharedmoe::ckpt::load(
        dir,
        &sharedmoe::model::param_specs(&cfg.model),
        sharedmoe::ckpt::Purpose::Weights,
    )
    .unwrap()
}

/// `experiment exp2 --scale tiny` with a 2-layer source model and 8 steps
/// per stage: every stage runs, every variant is scored with the expert
/// count its pruning leaves, stage 3 trains only the global router, the
/// distillation loss falls, the report and plots are written, and a rerun
/// reuses every step's output.
#[test]
fn exp2_tiny_runs_every_stage_and_writes_the_report() {
    let dir = std::env::temp_dir().join(format!("sharedmoe-exp2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let args = [
        "experiment",
        "exp2",
        "--scale",
        "tiny",
        "--out",
        out,
        "--set",
        "model.num_layers=2",
        "--set",
        "train.steps=8",
        "--set",
        "train.warmup_steps=2",
        "--set",
        "train.eval_batches=1",
    ];
    let printed = sharedmoe_ok(&args);
    let summary = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    assert!(printed.contains("## The hypothesis"), "{printed}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let variants = results["variants"].as_array().unwrap();
    // 5 unpruned models (the original, the pool before and after each
    // stage, the distilled pool on its own layers' experts), then 4 ratios
    // x (REAP, frequency, per-layer REAP, per-layer frequency, REAP +
    // fine-tune).
    assert_eq!(variants.len(), 5 + 4 * 5, "{summary}");
    // 2 MoE layers x 16 experts: a pool of 32.
    for v in variants {
        let (method, removed) = (
            v["method"].as_str().unwrap(),
            v["removed"].as_f64().unwrap(),
        );
        let keep = |n: f64| ((1.0 - removed) * n).round() as u64;
        let want = match method {
            "original" => 32,
            "layer_reap" | "layer_frequency" => 2 * keep(16.0),
            _ => keep(32.0),
        };
        assert_eq!(v["experts"].as_u64(), Some(want), "{v}");
        let ce = v["ce"].as_f64().unwrap();
        assert!(ce.is_finite() && ce > 0.0, "{v}");
        let label_row = format!("| {}% | {want} | {ce:.4} |", (removed * 100.0).round());
        assert!(
            summary.contains(&label_row),
            "`{label_row}` not in\n{summary}"
        );
    }
    let verdict = results["verdict"].as_str().unwrap();
    assert!(
        ["Supports", "Contradicts", "Cannot decide"]
            .iter()
            .any(|w| verdict.starts_with(w)),
        "{verdict}"
    );
    assert!(summary.contains(verdict), "{summary}");
    let classes = &results["experts_after_router_training"];
    let total: u64 = ["universal", "dead", "long_tail"]
        .iter()
        .map(|k| classes[k].as_u64().unwrap())
        .sum();
    assert_eq!(total, 32, "{classes}");
    // Each layer's routing mass, split by origin, sums to 1.
    for row in results["origin_shares"].as_array().unwrap() {
        let s: f64 = row
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((s - 1.0).abs() < 1e-9, "{row}");
    }
    // The distillation loss fell over stage 1's 8 steps.
    let line = summary
        .lines()
        .find(|l| l.starts_with("- distillation loss"))
        .expect("the distillation line");
    let nums: Vec<f64> = line
        .rsplit(": ")
        .next()
        .unwrap()
        .split(" -> ")
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(nums[1] < nums[0], "{line}");
    assert_eq!(png_size(&dir.join("pruning_curve.png")), (1200, 800));
    assert_eq!(png_size(&dir.join("expert_origin.png")), (1400, 900));
    // Stage 3 trained the global router and nothing else.
    let pruned = load_ckpt(&dir.join("pruned/pool-reap-50"));
    let tuned = load_ckpt(&dir.join("finetune/pool-reap-50/checkpoints/step_00000008"));
    for ((name, _, a), (_, _, b)) in pruned.params.iter().zip(&tuned.params) {
        if name == "model.pool.router.weight" {
            assert_ne!(a, b, "the router did not train");
        } else {
            assert!(a == b, "{name} changed in stage 3");
        }
    }
    // A rerun trains nothing again and scores the same checkpoints alike.
    let metrics = |run: &str| std::fs::read_to_string(dir.join(run).join("metrics.jsonl")).unwrap();
    let before = (metrics("distill"), metrics("finetune/pool-reap-90"));
    sharedmoe_ok(&args);
    assert_eq!(
        before,
        (metrics("distill"), metrics("finetune/pool-reap-90"))
    );
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    for (a, b) in variants.iter().zip(again["variants"].as_array().unwrap()) {
        assert_eq!(a["ce"], b["ce"], "{a} vs {b}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
