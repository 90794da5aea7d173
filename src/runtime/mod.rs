//! The PJRT C API, safely wrapped: plugin discovery and loading, clients
//! with named options and an optional key-value store, devices,
//! host<->device copies, compilation of StableHLO text, execution on one or
//! many devices with input donation.
//!
//! This module owns every raw pointer and every `unsafe` call into a
//! plugin; nothing above it touches PJRT directly. Each PJRT object has one
//! Rust owner whose `Drop` frees it exactly once, and owners keep what they
//! depend on alive (buffers and executables hold their client, clients
//! hold their plugin).

mod buffer;
mod client;
mod compile_options;
mod element_type;
mod error;
mod executable;
mod ffi;
mod memory_stats;
mod named;
mod offline;
pub(crate) mod plugin;
mod topology;

pub use buffer::Buffer;
pub use client::{Client, Device, KeyValueStore};
pub use compile_options::CompileOptions;
pub use element_type::{ElementType, NativeType};
pub use error::{Error, ErrorCode, Result};
pub use executable::{launch_id_sequence, Arg, Executable};
pub use memory_stats::MemoryStats;
pub use named::NamedValue;
pub use offline::Offline;
pub use plugin::{
    find_plugin, libtpu_init_args, preload_nvidia_libraries, set_libtpu_init_args, tpu_chips_in,
    tpu_present, Backend, NvidiaLibraries, Plugin, PluginLocation,
};
pub use topology::{CompiledProgram, Topology, TopologyDevice, TpuSlice, TPU_V4_HBM_BYTES};
