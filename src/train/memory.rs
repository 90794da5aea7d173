//! An up-front estimate of the memory training needs, so that a model too
//! large for the machine is refused with the figure before anything is
//! allocated (instead of aborting on allocation).
//!
//! Counted: the f32 training state of every replica, 16 bytes per
//! parameter (parameters, gradients, both Adam moments), and the host copy
//! of the checkpoint the run starts from, 12 bytes per parameter
//! (parameters and both moments). Activations, compiled programs and the
//! data pipeline come on top, so the figure is a lower bound. On the CPU
//! backend every replica lives in host memory; on accelerators each device
//! holds one replica's state and the host the checkpoint copy.

use anyhow::{bail, Result};

use crate::model::{count::TRAINING_BYTES_PER_PARAM, count_params};
use crate::runtime::{Backend, Client, Device, MemoryStats};

use super::config::Config;

/// Bytes per parameter of the host copy of a checkpoint: parameters and
/// both Adam moments, f32.
pub const HOST_COPY_BYTES_PER_PARAM: i64 = 12;

const GIB: f64 = (1u64 << 30) as f64;

/// What a run needs, in bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub params: i64,
    /// Replicas whose training state lives in the memory checked.
    pub replicas: i64,
    /// Training state of one device: 16 bytes per parameter, split over
    /// `mesh.fsdp` devices (a lower bound: small tensors stay whole).
    pub per_replica: u128,
    /// The host copy of the checkpoint (12 bytes per parameter).
    pub host_copy: u128,
}

impl Estimate {
    pub fn new(cfg: &Config, replicas: i64) -> Estimate {
        let params = count_params(&cfg.model);
        let (_, fsdp) = cfg.mesh_axes();
        Estimate {
            params,
            replicas,
            per_replica: params as u128 * TRAINING_BYTES_PER_PARAM as u128 / fsdp as u128,
            host_copy: params as u128 * HOST_COPY_BYTES_PER_PARAM as u128,
        }
    }

    /// Host bytes of a CPU-backend process running `replicas` replicas.
    pub fn cpu_host(&self) -> u128 {
        self.per_replica * self.replicas as u128 + self.host_copy
    }
}

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

/// MemAvailable of /proc/meminfo, in bytes.
pub fn host_available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u128> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u128 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value * 1024),
        _ => None,
    }
}

/// The refusal for a CPU-backend run that needs `need` host bytes where
/// `available` are free.
fn check_cpu(e: &Estimate, available: u128) -> Result<()> {
    let need = e.cpu_host();
    if need > available {
        bail!(
            "the model needs about {} for parameters, gradients and Adam moments ({} parameters x {} bytes x {} \
             replica{}, plus a {}-byte-per-parameter host copy of the checkpoint); this machine has {} available \
             (a smaller model, or fewer train.replicas)",
            gib(need),
            e.params,
            TRAINING_BYTES_PER_PARAM,
            e.replicas,
            if e.replicas == 1 { "" } else { "s" },
            HOST_COPY_BYTES_PER_PARAM,
            gib(available)
        );
    }
    Ok(())
}

/// The refusal for the host copy of an accelerator run.
fn check_host_copy(e: &Estimate, available: u128) -> Result<()> {
    if e.host_copy > available {
        bail!(
            "the model needs about {} of host memory for the checkpoint's parameters and Adam moments \
             ({} parameters x {} bytes); this machine has {} available",
            gib(e.host_copy),
            e.params,
            HOST_COPY_BYTES_PER_PARAM,
            gib(available)
        );
    }
    Ok(())
}

/// Refuses a run whose host-side state cannot fit in the host's available
/// memory, before anything is allocated: on the CPU backend the training
/// state of `local_replicas` replicas plus the checkpoint copy, on
/// accelerators the checkpoint copy. Skipped (with a debug log) where
/// /proc/meminfo cannot be read.
pub fn check_host_memory(cfg: &Config, local_replicas: i64) -> Result<()> {
    let e = Estimate::new(cfg, local_replicas);
    let Some(available) = host_available() else {
        tracing::debug!("no MemAvailable in /proc/meminfo: skipping the memory estimate");
        return Ok(());
    };
    if cfg.run.backend == Backend::Cpu {
        check_cpu(&e, available)
    } else {
        check_host_copy(&e, available)
    }
}

/// Refuses a run whose per-replica training state (16 bytes per
/// parameter) does not fit in the free memory of each of `client`'s
/// devices, where the plugin reports it (accelerators; the CPU plugin does
/// not, and [`check_host_memory`] covers it). Call once the client exists,
/// before the trainer uploads anything.
pub fn check_device_memory(cfg: &Config, client: &Client) -> Result<()> {
    let e = Estimate::new(cfg, 1);
    for d in client.devices() {
        let Some((limit, in_use)) = d.memory() else {
            tracing::debug!(
                "device {} ({}) reports no memory limit: skipping its memory estimate",
                d.id(),
                d.kind()
            );
            continue;
        };
        let free = (limit - in_use).max(0) as u128;
        check_device(&e, &format!("device {} ({})", d.id(), d.kind()), free)?;
    }
    Ok(())
}

fn check_device(e: &Estimate, device: &str, free: u128) -> Result<()> {
    if e.per_replica > free {
        bail!(
            "the model needs about {} per device for parameters, gradients and Adam moments \
             ({} parameters x {} bytes); {device} has {} available",
            gib(e.per_replica),
            e.params,
            TRAINING_BYTES_PER_PARAM,
            gib(free)
        );
    }
    Ok(())
}

/// Refuses a compiled step program whose buffers do not fit, with XLA's
/// own figure (its buffer assignment: arguments, outputs not aliased to an
/// argument, temporaries) rather than an out-of-memory kill at the first
/// step. Called before the state is uploaded. On the CPU backend the
/// `devices` share the host's memory; elsewhere each has its own.
pub fn check_compiled_step(cfg: &Config, stats: &MemoryStats, devices: &[Device]) -> Result<()> {
    let per_device = stats.live();
    let hint = format!(
        "XLA's buffer assignment: {} of arguments, {} of temporaries; lower train.micro_batch (now {}) \
         or train.seq_len (now {})",
        gib(stats.arguments.max(0) as u128),
        gib(stats.temporaries.max(0) as u128),
        cfg.train.micro_batch,
        cfg.train.seq_len
    );
    if cfg.run.backend == Backend::Cpu {
        let need = per_device.max(0) as u128 * devices.len() as u128;
        if let Some(available) = host_available() {
            if need > available {
                bail!(
                    "the compiled train step needs {} of host memory for {} replica(s); this machine \
                     has {} available ({hint})",
                    gib(need),
                    devices.len(),
                    gib(available)
                );
            }
        }
        return Ok(());
    }
    for d in devices {
        let Some((limit, in_use)) = d.memory() else {
            continue;
        };
        let free = (limit - in_use).max(0);
        if per_device > free {
            bail!(
                "the compiled train step needs {} per device; device {} ({}) has {} free ({hint})",
                gib(per_device as u128),
                d.id(),
                d.kind(),
                gib(free as u128)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(sets: &[&str]) -> Config {
        let base = r#"
[model]
preset = "tiny-sharedmoe"
[train]
seq_len = 16
global_batch = 8
micro_batch = 2
steps = 10
warmup_steps = 2
lr = 1e-3
min_lr = 1e-4
"#;
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::parse(base, &sets).unwrap()
    }

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       24000000 kB\nMemFree:  1 kB\nMemAvailable:   23907452 kB\n";
        assert_eq!(parse_mem_available(text), Some(23907452 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn too_large_models_are_refused_with_the_figures() {
        let c = cfg(&["model.hidden_size=65536", "train.replicas=2"]);
        let e = Estimate::new(&c, 2);
        assert_eq!(e.per_replica, e.params as u128 * 16);
        assert_eq!(e.cpu_host(), e.params as u128 * (2 * 16 + 12));
        let msg = check_cpu(&e, 22 << 30).unwrap_err().to_string();
        assert!(
            msg.contains(&format!(
                "({} parameters x 16 bytes x 2 replicas, plus a 12-byte-per-parameter host copy",
                e.params
            )) && msg.contains("this machine has 22.0 GiB available"),
            "{msg}"
        );
        assert!(msg.starts_with("the model needs about "), "{msg}");
        check_cpu(&e, e.cpu_host()).unwrap();
        let msg = check_device(&e, "device 0 (H100)", 80 << 30)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("per device") && msg.contains("device 0 (H100) has 80.0 GiB available"),
            "{msg}"
        );
        let small = Estimate::new(&cfg(&[]), 1);
        check_cpu(&small, 1 << 30).unwrap();
        check_host_copy(&small, 1 << 30).unwrap();
    }
}
