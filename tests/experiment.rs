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
    for needle in ["| dense | 2130240 |", "| sharedmoe | 562752 |", "20480"] {
        assert!(summary.contains(needle), "`{needle}` not in:\n{summary}");
    }
    for model in ["dense", "sharedmoe"] {
        let run_dir = dir.join(model);
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
