//! What a compiled program needs in memory, as XLA's buffer assignment
//! reports it (`PJRT_Executable_GetCompiledMemoryStats`): for programs
//! compiled ahead of time for a topology and for loaded executables alike.

use super::error::Result;
use super::ffi;
use super::plugin::{args, pjrt_call, Plugin};

/// What one device needs to run a compiled program, in bytes
/// (`xla::CompiledMemoryStats`); per device, which for a replicated
/// program is per replica.
///
/// Serialisable, with absent fields zero: a peer (JAX's `memory_analysis()`)
/// may report only some of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MemoryStats {
    pub generated_code: i64,
    pub arguments: i64,
    pub outputs: i64,
    /// Bytes of the arguments reused for outputs (donation).
    pub aliased: i64,
    pub temporaries: i64,
    /// XLA's peak, where the plugin reports it (0 otherwise).
    pub peak: i64,
    pub host_generated_code: i64,
    pub host_arguments: i64,
    pub host_outputs: i64,
    pub host_aliased: i64,
    pub host_temporaries: i64,
}

impl MemoryStats {
    /// Device memory the program holds while it runs: arguments, outputs
    /// not aliased to an argument, temporaries and the code (MaxText's and
    /// JAX's sum of `memory_analysis()`, plus the code).
    pub fn total(&self) -> i64 {
        self.live() + self.generated_code
    }

    /// The buffers the program holds while it runs: arguments, outputs that
    /// do not reuse a donated argument, and temporaries (the code aside).
    pub fn live(&self) -> i64 {
        self.arguments + self.outputs - self.aliased + self.temporaries
    }
}

impl MemoryStats {
    /// The stats of an (unloaded) executable.
    pub(crate) fn of(
        plugin: &Plugin,
        executable: *mut ffi::PJRT_Executable,
    ) -> Result<MemoryStats> {
        let mut a = args!(PJRT_Executable_GetCompiledMemoryStats_Args { executable });
        pjrt_call!(
            plugin,
            PJRT_Executable_GetCompiledMemoryStats,
            &mut a,
            "compiled memory stats"
        )?;
        Ok(MemoryStats {
            generated_code: a.generated_code_size_in_bytes,
            arguments: a.argument_size_in_bytes,
            outputs: a.output_size_in_bytes,
            aliased: a.alias_size_in_bytes,
            temporaries: a.temp_size_in_bytes,
            peak: a.peak_memory_in_bytes,
            host_generated_code: a.host_generated_code_size_in_bytes,
            host_arguments: a.host_argument_size_in_bytes,
            host_outputs: a.host_output_size_in_bytes,
            host_aliased: a.host_alias_size_in_bytes,
            host_temporaries: a.host_temp_size_in_bytes,
        })
    }
}
