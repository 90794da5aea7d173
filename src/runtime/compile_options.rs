//! The serialized `xla.CompileOptionsProto` that `PJRT_Client_Compile`
//! takes, built from the subset in `proto/xla_compile_options.proto`.

use prost::Message;

mod xla {
    include!(concat!(env!("OUT_DIR"), "/xla.rs"));
}

/// How to compile a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Replicas of the program (data parallelism; `all_reduce` spans them).
    pub num_replicas: usize,
    /// Partitions of one SPMD program (`use_spmd_partitioning`): XLA's
    /// partitioner splits the module by its sharding annotations.
    pub num_partitions: usize,
    pub use_spmd_partitioning: bool,
    /// Shardy (`sdy.sharding` annotations) rather than GSPMD
    /// (`mhlo.sharding` strings) partitions the module.
    pub use_shardy_partitioner: bool,
    /// Device id of each replica, or with partitions (one replica) of each
    /// partition; `None` uses devices 0..n when there is more than one.
    pub device_assignment: Option<Vec<i64>>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            num_replicas: 1,
            num_partitions: 1,
            use_spmd_partitioning: false,
            use_shardy_partitioner: false,
            device_assignment: None,
        }
    }
}

impl CompileOptions {
    pub fn replicas(n: usize) -> Self {
        CompileOptions {
            num_replicas: n,
            ..Default::default()
        }
    }

    /// One SPMD program over `n` devices (1 replica x `n` partitions).
    pub fn spmd(n: usize) -> Self {
        CompileOptions {
            num_partitions: n,
            use_spmd_partitioning: true,
            ..Default::default()
        }
    }

    pub fn to_proto_bytes(&self) -> Vec<u8> {
        let devices = self.num_replicas * self.num_partitions;
        let assignment = match (&self.device_assignment, devices) {
            (Some(ids), _) => Some(ids.clone()),
            (None, n) if n > 1 => Some((0..n as i64).collect()),
            _ => None,
        };
        // Replicas x partitions: one ComputationDevice per partition, each
        // listing its replicas' devices.
        let device_assignment = assignment.map(|ids| {
            let replicas = ids.len() / self.num_partitions.max(1);
            xla::DeviceAssignmentProto {
                replica_count: replicas as i32,
                computation_count: self.num_partitions.max(1) as i32,
                computation_devices: (0..self.num_partitions.max(1))
                    .map(|p| xla::device_assignment_proto::ComputationDevice {
                        replica_device_ids: (0..replicas)
                            .map(|r| ids[r * self.num_partitions.max(1) + p])
                            .collect(),
                    })
                    .collect(),
            }
        });
        let build = xla::ExecutableBuildOptionsProto {
            // -1: not pinned to one device (XLA's default; proto3's 0 would pin device 0).
            device_ordinal: -1,
            num_replicas: self.num_replicas as i64,
            num_partitions: self.num_partitions as i64,
            use_spmd_partitioning: self.use_spmd_partitioning,
            use_shardy_partitioner: self.use_shardy_partitioner,
            device_assignment,
        };
        xla::CompileOptionsProto {
            executable_build_options: Some(build),
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_replicas_and_assignment() {
        let bytes = CompileOptions::replicas(2).to_proto_bytes();
        let decoded = xla::CompileOptionsProto::decode(bytes.as_slice()).unwrap();
        let b = decoded.executable_build_options.unwrap();
        assert_eq!(
            (b.num_replicas, b.num_partitions, b.device_ordinal),
            (2, 1, -1)
        );
        let da = b.device_assignment.unwrap();
        assert_eq!(da.replica_count, 2);
        assert_eq!(da.computation_devices[0].replica_device_ids, vec![0, 1]);
        // Field numbers on the wire: executable_build_options = 3 (tag 0x1a).
        assert_eq!(bytes[0], 0x1a);
    }

    #[test]
    fn encodes_spmd_partitions_one_device_per_partition() {
        let options = CompileOptions {
            device_assignment: Some(vec![3, 1, 2, 0]),
            use_shardy_partitioner: true,
            ..CompileOptions::spmd(4)
        };
        let decoded =
            xla::CompileOptionsProto::decode(options.to_proto_bytes().as_slice()).unwrap();
        let b = decoded.executable_build_options.unwrap();
        assert_eq!((b.num_replicas, b.num_partitions), (1, 4));
        assert!(b.use_spmd_partitioning && b.use_shardy_partitioner);
        let da = b.device_assignment.unwrap();
        assert_eq!((da.replica_count, da.computation_count), (1, 4));
        let ids: Vec<Vec<i64>> = da
            .computation_devices
            .iter()
            .map(|c| c.replica_device_ids.clone())
            .collect();
        assert_eq!(ids, vec![vec![3], vec![1], vec![2], vec![0]]);
    }
}
