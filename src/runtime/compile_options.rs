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
    pub num_partitions: usize,
    /// Device id running each replica (one computation); `None` uses
    /// devices 0..num_replicas when there is more than one replica.
    pub device_assignment: Option<Vec<i64>>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            num_replicas: 1,
            num_partitions: 1,
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

    pub fn to_proto_bytes(&self) -> Vec<u8> {
        let assignment = match (&self.device_assignment, self.num_replicas) {
            (Some(ids), _) => Some(ids.clone()),
            (None, n) if n > 1 => Some((0..n as i64).collect()),
            _ => None,
        };
        let device_assignment = assignment.map(|ids| xla::DeviceAssignmentProto {
            replica_count: ids.len() as i32,
            computation_count: 1,
            computation_devices: vec![xla::device_assignment_proto::ComputationDevice {
                replica_device_ids: ids,
            }],
        });
        let build = xla::ExecutableBuildOptionsProto {
            // -1: not pinned to one device (XLA's default; proto3's 0 would pin device 0).
            device_ordinal: -1,
            num_replicas: self.num_replicas as i64,
            num_partitions: self.num_partitions as i64,
            use_spmd_partitioning: false,
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
}
