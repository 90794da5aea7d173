//! Multi-process training: a coordinator (one per job) and workers (one
//! per host) talking gRPC (`proto/coordinator.proto`). The coordinator owns
//! the job (membership, config, key-value store, metrics, checkpoints,
//! restarts); the workers own the devices and the data. On the CPU backend
//! the gradients of the workers are summed through the coordinator
//! ([`host_sum`]); on TPU and GPU, XLA collectives move them.

// tonic::Status (176 bytes) is the error type of every handler and of the
// helpers they call; boxing it would only move the cost to error paths.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod client;
pub mod coordinator;
pub mod host_sum;
pub mod kv;
pub mod launch;
pub mod shard_transfer;
pub mod tpu;
pub mod transfer;
pub mod worker;

/// Generated from `proto/coordinator.proto`.
pub mod proto {
    tonic::include_proto!("sharedmoe.v1");
}
