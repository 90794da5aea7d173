//! `sharedmoe data prepare` as a real process: a run that fails midway
//! leaves no temporary file, and the temporary files of a killed run are
//! removed, with a log line, when the next run starts.

mod common;
mod fineweb;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fineweb::{scratch, write_fineweb};

fn words() -> Vec<String> {
    (0..20).map(|i| format!("w{i}")).collect()
}

fn docs(n: usize, prefix: &str) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let text: Vec<String> = (0..8).map(|j| format!("w{}", (i + j) % 20)).collect();
            (format!("<urn:{prefix}:{i}>"), text.join(" "))
        })
        .collect()
}

fn write(path: &Path, docs: &[(String, String)], per_group: usize) {
    let refs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    write_fineweb(path, &refs, per_group, true);
}

/// The names in `dir` ending in `.tmp`.
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

fn prepare_args<'a>(input: &'a str, tk: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["data", "prepare", input, "--tokenizer", tk, "--out", out]
}

#[test]
fn a_prepare_that_fails_midway_leaves_no_temporary_file() {
    let dir = scratch("prepare-fails");
    let tk = common::word_level_tokenizer(&dir, &words());
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    write(&input.join("000.parquet"), &docs(40, "a"), 10);
    // A second file whose footer is fine but whose text data is not UTF-8:
    // listing its row groups succeeds, reading one fails.
    let bad = input.join("001.parquet");
    let mut d = docs(10, "b");
    d[3].1 = "MARKERMARKER w1 w2".into();
    write(&bad, &d, 5);
    let mut bytes = std::fs::read(&bad).unwrap();
    let at = bytes
        .windows(12)
        .position(|w| w == b"MARKERMARKER")
        .unwrap();
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xff, 0xfe]);
    std::fs::write(&bad, bytes).unwrap();
    let out = dir.join("out");
    let args = prepare_args(
        input.to_str().unwrap(),
        tk.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let o = common::sharedmoe(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}:\n{stderr}", o.status);
    assert!(stderr.contains("001.parquet"), "names the file:\n{stderr}");
    assert!(out.is_dir(), "the failure came after the output was opened");
    assert_eq!(temp_files(&out), Vec::<String>::new(), "{stderr}");
    assert!(!out.join("train.bin").exists() && !out.join("meta.json").exists());
    // Without the bad file the same output directory is fine.
    std::fs::remove_file(&bad).unwrap();
    common::sharedmoe_ok(&args);
    assert!(out.join("train.bin").exists() && out.join("meta.json").exists());
    assert_eq!(temp_files(&out), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_temporary_files_of_a_killed_prepare_are_removed_at_the_next_start() {
    let dir = scratch("prepare-killed");
    let tk = common::word_level_tokenizer(&dir, &words());
    let input = dir.join("in.parquet");
    // Enough text (about 40 MB) that the run is still tokenising when
    // killed.
    let long = "w1 w2 w3 w4 w5 w6 w7 w8 ".repeat(40_000_000 / 24);
    let mut d = docs(4, "a");
    d.push(("<urn:long>".into(), long));
    write(&input, &d, 1);
    let out = dir.join("out");
    let args = prepare_args(
        input.to_str().unwrap(),
        tk.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_sharedmoe"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("train.bin.tmp").exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "prepare ended before it could be killed"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.join("train.bin").exists(),
        "killed before it finished (make the input longer)"
    );
    let mut left = temp_files(&out);
    left.sort();
    assert_eq!(left, ["train.bin.tmp", "val.bin.tmp"]);
    std::fs::write(out.join("meta.json.tmp"), "{").unwrap();
    // The next run removes them, says so, and succeeds.
    let o = common::sharedmoe(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}:\n{stderr}", o.status);
    for name in ["train.bin.tmp", "val.bin.tmp", "meta.json.tmp"] {
        let line = format!(
            "removed {}, left by an earlier run that did not finish",
            out.join(name).display()
        );
        assert!(stderr.contains(&line), "want {line:?} in:\n{stderr}");
    }
    assert_eq!(temp_files(&out), Vec::<String>::new());
    assert!(out.join("train.bin").exists() && out.join("meta.json").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
