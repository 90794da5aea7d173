//! `sharedmoe bench data`: tokens/s of parquet -> packed rows of S+1
//! tokens through our stream, next to the Python peer a user would
//! otherwise write (pyarrow + HF `tokenizers`, `benches/peers/data_python.py`),
//! measured in the same run on the same files and tokenizer. The peer is
//! installed on first use into its own venv, `target/bench-data-venv`.
//! Both must produce the same rows; the benchmark checks that too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::data::parquet::{all_row_groups, expand_inputs, BadFilePolicy};
use crate::data::stream::{StreamOptions, TokenStream};
use crate::data::tokenizer;

/// Pinned so that a ratio printed today means the same tomorrow.
const PEER_PACKAGES: &[&str] = &["pyarrow==26.0.1", "tokenizers==0.23.3", "numpy==2.3.5"];

fn peer_python(root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/bench-data-venv");
    let python = venv.join("bin/python");
    if python.exists() {
        return Ok(python);
    }
    eprintln!(
        "installing the Python peer into {} ({})",
        venv.display(),
        PEER_PACKAGES.join(", ")
    );
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .context("running python3 -m venv")?
        .success()
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(PEER_PACKAGES)
            .status()
            .context("running pip")?
            .success();
    if !ok {
        let _ = std::fs::remove_dir_all(&venv);
        bail!("could not install the Python peer into {}", venv.display());
    }
    Ok(python)
}

/// One pass of our stream over every row group, in file order, as the
/// peer reads them: the rows and the seconds it took.
fn ours_once(
    files: &[PathBuf],
    tk: &Arc<tokenizers::Tokenizer>,
    row_len: usize,
) -> Result<(Vec<u32>, f64)> {
    let began = Instant::now();
    let (groups, _) = all_row_groups(files, BadFilePolicy::Fail)?;
    let opts = StreamOptions::single_pass(row_len, 0);
    let mut s = TokenStream::open(groups, tk.clone(), opts, None)?;
    let mut out = vec![];
    while let Some(row) = s.next_row()? {
        out.extend(row);
    }
    Ok((out, began.elapsed().as_secs_f64()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn data(
    inputs: &[PathBuf],
    tokenizer_path: &Path,
    seq_len: usize,
    repeats: usize,
) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = expand_inputs(inputs)?;
    let tk = Arc::new(tokenizer::load(tokenizer_path)?);
    let row_len = seq_len + 1;
    println!(
        "parquet -> packed rows of {row_len} tokens: {} files, tokenizer {} ({} tokens), {} threads",
        files.len(),
        tokenizer_path.display(),
        tk.get_vocab_size(true),
        rayon::current_num_threads()
    );
    let mut secs = vec![];
    let mut rows = vec![];
    ours_once(&files, &tk, row_len)?; // warm the page cache
    for _ in 0..repeats {
        let (r, s) = ours_once(&files, &tk, row_len)?;
        rows = r;
        secs.push(s);
    }
    let ours = median(secs);
    let tokens = rows.len();
    println!(
        "sharedmoe: {tokens} tokens ({} rows) in {:.3} s (median of {repeats}): {:.0} tokens/s",
        tokens / row_len,
        ours,
        tokens as f64 / ours
    );
    let python = peer_python(root)?;
    let dump =
        std::env::temp_dir().join(format!("sharedmoe-bench-data-{}.u32", std::process::id()));
    let out = Command::new(&python)
        .arg(root.join("benches/peers/data_python.py"))
        .arg("--tokenizer")
        .arg(tokenizer_path)
        .args([
            "--row-len",
            &row_len.to_string(),
            "--repeats",
            &(repeats + 1).to_string(),
        ])
        .arg("--dump")
        .arg(&dump)
        .args(&files)
        .output()
        .context("running the Python peer")?;
    if !out.status.success() {
        bail!(
            "the Python peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("peer output: {}", String::from_utf8_lossy(&out.stdout)))?;
    // Its first repeat warms up, as ours did.
    let peer_secs: Vec<f64> = report["seconds"]
        .as_array()
        .map(|a| a.iter().skip(1).filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    let peer = median(peer_secs);
    let peer_tokens = report["tokens"].as_u64().unwrap_or(0) as usize;
    println!(
        "python (pyarrow {}, tokenizers {} {}): {peer_tokens} tokens in {:.3} s: {:.0} tokens/s",
        report["pyarrow"].as_str().unwrap_or("?"),
        report["tokenizers"].as_str().unwrap_or("?"),
        report["encode"].as_str().unwrap_or("?"),
        peer,
        peer_tokens as f64 / peer
    );
    let peer_rows: Vec<u32> = std::fs::read(&dump)
        .with_context(|| format!("reading {}", dump.display()))?
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let _ = std::fs::remove_file(&dump);
    let n = tokens.min(peer_rows.len());
    let same = rows[..n] == peer_rows[..n];
    println!(
        "same rows as the peer: {} (first {} rows compared)",
        if same { "yes" } else { "NO" },
        n / row_len
    );
    println!(
        "ratio sharedmoe / python tokens/s: {:.2}",
        (tokens as f64 / ours) / (peer_tokens as f64 / peer)
    );
    if !same {
        bail!("our rows differ from the peer's: the tokenizers disagree or packing is wrong");
    }
    Ok(())
}
