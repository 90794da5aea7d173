//! Event files read back by TensorBoard itself: its `EventAccumulator`
//! (from the pinned `tensorboard` pip package, installed on first use into
//! its own venv, `target/tb-venv`) must see our tags, steps and values.

mod common;

use std::path::PathBuf;
use std::process::Command;

use sharedmoe::train::tensorboard::EventWriter;

/// Pinned so the reader is the same every run (tensorboard 2.20.0 on
/// Python 3.11; protobuf and numpy as pip resolved them for it).
const PACKAGES: &[&str] = &["tensorboard==2.20.0", "protobuf==7.36.2", "numpy==2.4.6"];

/// The venv's python, creating the venv and installing PACKAGES unless a
/// previous run left the marker saying they are in.
fn tb_python() -> PathBuf {
    common::python_venv("tb-venv", PACKAGES)
}

const READER: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
out = {"file_version": acc.file_version, "scalars": {}}
for tag in acc.Tags()["scalars"]:
    out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
print(json.dumps(out))
"#;

#[test]
fn tensorboard_reads_our_scalars() {
    let python = tb_python();
    let dir = std::env::temp_dir().join(format!("sharedmoe-test-{}-tb", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let mut w = EventWriter::create(&dir).unwrap();
    let losses = [(0i64, 10.75), (1, 9.5), (2, 8.125), (10, 3.3)];
    for (step, v) in losses {
        w.scalar("train/loss", step, v).unwrap();
    }
    w.scalar("train/lr", 5, 3e-4).unwrap();
    w.write_row(&serde_json::json!({
        "step": 11, "loss": 3.25, "aux": 0.0125, "lr": 2.5e-4, "grad_norm": 0.75,
        "tokens": 49152, "step_time_s": 0.5, "tokens_per_s": 8192.0, "mfu": null,
        "val_loss": 3.5
    }))
    .unwrap();
    w.flush().unwrap();
    drop(w);

    let out = Command::new(&python)
        .args(["-c", READER])
        .arg(&dir)
        .output()
        .expect("running the venv's python");
    assert!(
        out.status.success(),
        "EventAccumulator failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(got["file_version"], serde_json::json!(2.0), "{got}");

    let series = |tag: &str| -> Vec<(i64, f32)> {
        got["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no tag {tag} in {got}"))
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32))
            .collect()
    };
    let mut want_loss: Vec<(i64, f32)> = losses.iter().map(|&(s, v)| (s, v as f32)).collect();
    want_loss.push((11, 3.25));
    assert_eq!(series("train/loss"), want_loss);
    assert_eq!(series("train/lr"), vec![(5, 3e-4f32), (11, 2.5e-4f32)]);
    assert_eq!(series("train/aux"), vec![(11, 0.0125f32)]);
    assert_eq!(series("train/grad_norm"), vec![(11, 0.75f32)]);
    assert_eq!(series("train/tokens"), vec![(11, 49152f32)]);
    assert_eq!(series("train/step_time_s"), vec![(11, 0.5f32)]);
    assert_eq!(series("train/tokens_per_s"), vec![(11, 8192f32)]);
    assert_eq!(series("val/loss"), vec![(11, 3.5f32)]);

    let mut tags: Vec<&str> = got["scalars"]
        .as_object()
        .unwrap()
        .keys()
        .map(|s| s.as_str())
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        [
            "train/aux",
            "train/grad_norm",
            "train/loss",
            "train/lr",
            "train/step_time_s",
            "train/tokens",
            "train/tokens_per_s",
            "val/loss"
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
