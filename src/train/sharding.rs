//! Where the training state and the batch lie on the job's mesh.
//!
//! The mesh has two axes, `data` and `fsdp` (MaxText's and Levanter's
//! names), devices numbered data-major. The batch is split over both, so
//! every device takes its own `micro_batch` sequences. Under `fsdp` each
//! parameter and both its Adam moments are split along one dimension (the
//! rule below) and copied over `data`; XLA all-gathers a parameter where a
//! matmul needs it whole and reduce-scatters its gradient back to shards.

use crate::graph::{Mesh, Result, Sharding};
use crate::model::{ParamSpec, Role};

use super::config::Config;

pub const DATA: &str = "data";
pub const FSDP: &str = "fsdp";

/// The job's mesh, or one process's share of it (the local devices of a
/// CPU job whose processes XLA cannot connect).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepMesh {
    pub mesh: Mesh,
    pub data: usize,
    pub fsdp: usize,
}

impl StepMesh {
    pub fn new(data: usize, fsdp: usize) -> Result<StepMesh> {
        Ok(StepMesh {
            mesh: Mesh::new(&[(DATA, data), (FSDP, fsdp)])?,
            data,
            fsdp,
        })
    }

    /// The job's mesh of `cfg`.
    pub fn of(cfg: &Config) -> Result<StepMesh> {
        let (data, fsdp) = cfg.mesh_axes();
        StepMesh::new(data, fsdp)
    }

    /// The devices of the mesh.
    pub fn devices(&self) -> usize {
        self.data * self.fsdp
    }

    /// A batch-major tensor of rank `rank` whose dimension `dim` counts
    /// sequences: split over every device, data-major.
    pub fn batch(&self, rank: usize, dim: usize) -> Result<Sharding> {
        Sharding::split(&self.mesh, rank, dim, &[DATA, FSDP])
    }

    /// A value every device holds whole (scalars, the step counter).
    pub fn replicated(&self, rank: usize) -> Sharding {
        Sharding::replicated(&self.mesh, rank)
    }

    /// Where a parameter (and each of its Adam moments) lies: see
    /// [`fsdp_dim`].
    pub fn param(&self, spec: &ParamSpec) -> Result<Sharding> {
        match fsdp_dim(spec, self.fsdp) {
            Some(dim) => Sharding::split(&self.mesh, spec.dims.len(), dim, &[FSDP]),
            None => Ok(self.replicated(spec.dims.len())),
        }
    }
}

/// The dimension a parameter is split along over `fsdp` devices, None for
/// a copy on each:
/// - norm gains and the router are small (D and E x D values): copied;
/// - stacked experts along E when `fsdp` divides it, so each device keeps
///   whole experts (the layout expert parallelism will route tokens to);
/// - everything else along its largest dimension that `fsdp` divides (the
///   first of equals); a tensor with none stays whole.
pub fn fsdp_dim(spec: &ParamSpec, fsdp: usize) -> Option<usize> {
    let fsdp = fsdp as i64;
    if fsdp == 1 || matches!(spec.role, Role::Norm | Role::Router) {
        return None;
    }
    let divisible = |d: usize| spec.dims[d] % fsdp == 0;
    if spec.role == Role::Experts && divisible(0) {
        return Some(0);
    }
    (0..spec.dims.len())
        .filter(|&d| divisible(d))
        .max_by_key(|&d| (spec.dims[d], std::cmp::Reverse(d)))
}

/// Bytes of the parameters (f32) and the trained ones' two Adam moments
/// on each of `fsdp` devices under [`fsdp_dim`]; `trainable` are the
/// positions in `specs` of the trained parameters (`StepLayout`).
pub fn state_bytes_per_device(specs: &[ParamSpec], trainable: &[usize], fsdp: usize) -> i64 {
    specs
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let split = fsdp_dim(s, fsdp).map_or(1, |_| fsdp as i64);
            let copies = if trainable.binary_search(&k).is_ok() {
                3
            } else {
                1
            };
            copies * 4 * s.num_elements() / split
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{param_specs, ModelConfig};

    #[test]
    fn the_rule_by_role() {
        let specs = param_specs(&ModelConfig::preset("sharedmoe50m").unwrap());
        let dim_of = |name: &str, fsdp| {
            let s = specs.iter().find(|s| s.name == name).unwrap();
            fsdp_dim(s, fsdp)
        };
        // [32000, 128] table: along the vocabulary.
        assert_eq!(dim_of("model.embed_tokens.weight", 16), Some(0));
        // Gains and the router stay whole.
        assert_eq!(dim_of("model.norm.weight", 16), None);
        assert_eq!(dim_of("model.shared_moe.router.weight", 16), None);
        // [16, F, D] experts along E; with 32 devices E = 16 does not
        // divide, so the largest divisible dimension.
        assert_eq!(dim_of("model.shared_moe.experts.gate_proj", 16), Some(0));
        assert_eq!(dim_of("model.shared_moe.experts.gate_proj", 32), Some(2));
        // Nothing is split for fsdp = 1.
        assert_eq!(dim_of("model.embed_tokens.weight", 1), None);
    }
}
