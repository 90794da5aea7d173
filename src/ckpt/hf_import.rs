//! A Hugging Face checkpoint ([`HfCheckpoint`]) written as ours: every
//! parameter of the model its config describes, under SPEC names, in
//! f32, with `config.json` and `state.json` (step 0, no optimizer file:
//! moments of zero). Per-expert tensors (`mlp.experts.{i}.gate_proj.weight`)
//! are stacked along E into our `mlp.experts.gate_proj`.
//!
//! Streams: every source tensor is checked (present, shape) before
//! anything is written; then one parameter at a time is read, converted
//! and appended to `model.safetensors` ([`TensorFileWriter`]), so memory
//! holds about one parameter (the largest: a layer's stacked experts).

use std::path::Path;

use anyhow::{bail, Result};

use super::atomic::write_synced;
use super::hf::HfCheckpoint;
use super::integrity::FileDigest;
use super::streamed::TensorFileWriter;
use super::{hf_config, TrainingState};
use crate::model::{param_specs, ParamSpec, Role};

/// Where one of our parameters comes from.
enum Source {
    /// The tensor of the same name.
    Same,
    /// These per-expert tensors, stacked along a new leading axis.
    Stacked(Vec<String>),
}

/// HF tensors with nothing to import: RoPE tables some exports carry,
/// and the head of a tied model.
fn ignorable(name: &str, tied: bool) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
}

/// The per-expert names behind our stacked `{prefix}.experts.{proj}`.
fn source(spec: &ParamSpec) -> Source {
    if spec.role != Role::Experts {
        return Source::Same;
    }
    let (prefix, proj) = spec
        .name
        .rsplit_once(".experts.")
        .expect("stacked expert names are {prefix}.experts.{proj}");
    Source::Stacked(
        (0..spec.dims[0])
            .map(|i| format!("{prefix}.experts.{i}.{proj}.weight"))
            .collect(),
    )
}

/// What an import wrote.
pub struct Imported {
    pub tensors: usize,
    pub values: i64,
    /// Values of the largest parameter (what memory holds at once).
    pub largest: i64,
}

/// Writes `hf` as our checkpoint directory `out` (which must not exist):
/// the model `hf`'s config describes (`model`, from
/// [`super::hf::model_config`]), `config_toml` as its recorded run config,
/// `max_positions` in `config.json`. `progress(done, total, name)` is
/// called after each parameter.
pub fn import(
    hf: &HfCheckpoint,
    model: &crate::model::ModelConfig,
    max_positions: i64,
    config_toml: &str,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Imported> {
    if out.exists() {
        bail!(
            "{}: already exists; import-hf writes a new directory",
            out.display()
        );
    }
    let specs = param_specs(model);
    // Check every source before writing anything.
    let mut used = std::collections::BTreeSet::new();
    for spec in &specs {
        match source(spec) {
            Source::Same => {
                hf.tensor(&spec.name, &spec.dims)?;
                used.insert(spec.name.clone());
            }
            Source::Stacked(names) => {
                for n in names {
                    hf.tensor(&n, &spec.dims[1..])?;
                    used.insert(n);
                }
            }
        }
    }
    let unused: Vec<&String> = hf
        .tensors
        .keys()
        .filter(|n| !used.contains(*n) && !ignorable(n, model.tie_word_embeddings))
        .collect();
    if let Some(first) = unused.first() {
        bail!(
            "{}: {} tensor(s) the model would not use, first `{first}` (a bias, or an \
             architecture this config does not describe)",
            hf.dir.display(),
            unused.len()
        );
    }

    super::atomic::install_dir_with(out, |tmp| {
        write_into(hf, model, max_positions, config_toml, &specs, tmp, progress)
    })
}

fn write_into(
    hf: &HfCheckpoint,
    model: &crate::model::ModelConfig,
    max_positions: i64,
    config_toml: &str,
    specs: &[ParamSpec],
    dir: &Path,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<Imported> {
    let layout: Vec<(String, Vec<i64>)> = specs
        .iter()
        .map(|s| (s.name.clone(), s.dims.clone()))
        .collect();
    let mut writer = TensorFileWriter::create(&dir.join("model.safetensors"), &layout)?;
    let (mut values, mut largest) = (0i64, 0i64);
    for (i, spec) in specs.iter().enumerate() {
        let data = match source(spec) {
            Source::Same => hf.read_f32(&spec.name, &spec.dims)?,
            Source::Stacked(names) => {
                let mut all = Vec::with_capacity(spec.num_elements() as usize);
                for n in names {
                    all.extend(hf.read_f32(&n, &spec.dims[1..])?);
                }
                all
            }
        };
        writer.write(&spec.name, &data)?;
        values += data.len() as i64;
        largest = largest.max(data.len() as i64);
        progress(i + 1, specs.len(), &spec.name);
    }
    let mut files = std::collections::BTreeMap::new();
    files.insert("model.safetensors".to_string(), writer.finish()?);
    let config = serde_json::to_string_pretty(&hf_config(model, max_positions))?.into_bytes();
    write_synced(&dir.join("config.json"), &config)?;
    files.insert("config.json".to_string(), FileDigest::of(&config));
    let state = TrainingState {
        files,
        ..TrainingState::fresh(config_toml.to_string(), 1, 0)
    };
    write_synced(
        &dir.join("state.json"),
        &serde_json::to_string_pretty(&state)?.into_bytes(),
    )?;
    Ok(Imported {
        tensors: specs.len(),
        values,
        largest,
    })
}
