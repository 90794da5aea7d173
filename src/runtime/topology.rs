//! Ahead-of-time compilation for a device topology this machine does not
//! have (a TPU slice compiled on a CPU host): `PJRT_TopologyDescription_*`,
//! `PJRT_Compile`, and what the compiled (not loaded) executable reports:
//! `PJRT_Executable_GetCompiledMemoryStats` and
//! `PJRT_Executable_GetCostAnalysis`.

use std::ffi::c_char;
use std::fmt;
use std::sync::Arc;

use super::compile_options::CompileOptions;
use super::error::{Error, Result};
use super::ffi;
use super::memory_stats::MemoryStats;
use super::named::{named_values, NamedValue};
use super::plugin::{args, pjrt_call, Plugin};

/// Copies a `(ptr, len)` string the plugin returned.
fn plugin_str(ptr: *const c_char, len: usize) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: the plugin guarantees `len` readable bytes at `ptr`.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
        .into_owned()
}

/// One device of a topology, as its description gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyDevice {
    pub id: i32,
    /// The host (process) that drives it.
    pub process_index: i32,
    pub kind: String,
}

struct TopologyInner {
    plugin: Arc<Plugin>,
    raw: *mut ffi::PJRT_TopologyDescription,
}

// SAFETY: a topology description is immutable once created.
unsafe impl Send for TopologyInner {}
unsafe impl Sync for TopologyInner {}

impl Drop for TopologyInner {
    fn drop(&mut self) {
        let mut a = args!(PJRT_TopologyDescription_Destroy_Args { topology: self.raw });
        if let Err(e) = pjrt_call!(
            self.plugin,
            PJRT_TopologyDescription_Destroy,
            &mut a,
            "destroying topology"
        ) {
            tracing::warn!("{e}");
        }
    }
}

/// A device topology to compile for, without its devices
/// (`PJRT_TopologyDescription`).
#[derive(Clone)]
pub struct Topology {
    inner: Arc<TopologyInner>,
    name: String,
}

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topology({})", self.name)
    }
}

impl Topology {
    /// `PJRT_TopologyDescription_Create` with the plugin's topology name
    /// (libtpu: e.g. `v4:2x2x4`) and its options. The plugin must be
    /// initialised (for libtpu: [`Plugin::initialize_offline`]).
    pub fn create(
        plugin: Arc<Plugin>,
        name: &str,
        options: &[(&str, NamedValue)],
    ) -> Result<Topology> {
        let ctx = format!("creating topology {name}");
        let named = named_values(options);
        let mut a = args!(PJRT_TopologyDescription_Create_Args {
            topology_name: name.as_ptr() as *const c_char,
            topology_name_size: name.len(),
            create_options: named.as_ptr(),
            num_options: named.len(),
        });
        pjrt_call!(plugin, PJRT_TopologyDescription_Create, &mut a, &ctx)?;
        if a.topology.is_null() {
            return Err(Error::new(ctx, "plugin returned no topology"));
        }
        Ok(Topology {
            inner: Arc::new(TopologyInner {
                plugin,
                raw: a.topology,
            }),
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The platform (e.g. `tpu`).
    pub fn platform_name(&self) -> Result<String> {
        let mut a = args!(PJRT_TopologyDescription_PlatformName_Args {
            topology: self.inner.raw
        });
        pjrt_call!(
            self.inner.plugin,
            PJRT_TopologyDescription_PlatformName,
            &mut a,
            "topology platform name"
        )?;
        Ok(plugin_str(a.platform_name, a.platform_name_size))
    }

    /// The plugin's version text for this platform.
    pub fn platform_version(&self) -> Result<String> {
        let mut a = args!(PJRT_TopologyDescription_PlatformVersion_Args {
            topology: self.inner.raw
        });
        pjrt_call!(
            self.inner.plugin,
            PJRT_TopologyDescription_PlatformVersion,
            &mut a,
            "topology platform version"
        )?;
        Ok(plugin_str(a.platform_version, a.platform_version_size))
    }

    /// Every device of the topology, in the plugin's order.
    pub fn devices(&self) -> Result<Vec<TopologyDevice>> {
        let p = &self.inner.plugin;
        let mut a = args!(PJRT_TopologyDescription_GetDeviceDescriptions_Args {
            topology: self.inner.raw
        });
        pjrt_call!(
            p,
            PJRT_TopologyDescription_GetDeviceDescriptions,
            &mut a,
            "topology devices"
        )?;
        if a.num_descriptions == 0 {
            return Ok(vec![]);
        }
        // SAFETY: `num` descriptions owned by the topology.
        let descs = unsafe { std::slice::from_raw_parts(a.descriptions, a.num_descriptions) };
        descs
            .iter()
            .map(|&dd| {
                let mut id = args!(PJRT_DeviceDescription_Id_Args {
                    device_description: dd
                });
                pjrt_call!(p, PJRT_DeviceDescription_Id, &mut id, "device id")?;
                let mut process = args!(PJRT_DeviceDescription_ProcessIndex_Args {
                    device_description: dd
                });
                pjrt_call!(
                    p,
                    PJRT_DeviceDescription_ProcessIndex,
                    &mut process,
                    "device process index"
                )?;
                let mut kind = args!(PJRT_DeviceDescription_Kind_Args {
                    device_description: dd
                });
                pjrt_call!(p, PJRT_DeviceDescription_Kind, &mut kind, "device kind")?;
                Ok(TopologyDevice {
                    id: id.id,
                    process_index: process.process_index,
                    kind: plugin_str(kind.device_kind, kind.device_kind_size),
                })
            })
            .collect()
    }

    /// Compiles a StableHLO module (MLIR text) for this topology
    /// (`PJRT_Compile`): nothing runs, nothing is loaded.
    pub fn compile(&self, mlir: &str, options: &CompileOptions) -> Result<CompiledProgram> {
        let ctx = format!("compiling for topology {}", self.name);
        let format = "mlir";
        let program = args!(PJRT_Program {
            code: mlir.as_ptr() as *mut c_char,
            code_size: mlir.len(),
            format: format.as_ptr() as *const c_char,
            format_size: format.len(),
        });
        let opts = options.to_proto_bytes();
        let mut a = args!(PJRT_Compile_Args {
            topology: self.inner.raw,
            program: &program,
            compile_options: opts.as_ptr() as *const c_char,
            compile_options_size: opts.len(),
        });
        pjrt_call!(self.inner.plugin, PJRT_Compile, &mut a, &ctx)?;
        if a.executable.is_null() {
            return Err(Error::new(ctx, "plugin returned no executable"));
        }
        Ok(CompiledProgram {
            raw: a.executable,
            _topology: self.inner.clone(),
        })
    }
}

/// A compiled, unloaded executable (`PJRT_Executable`).
pub struct CompiledProgram {
    raw: *mut ffi::PJRT_Executable,
    _topology: Arc<TopologyInner>,
}

// SAFETY: an unloaded executable is immutable.
unsafe impl Send for CompiledProgram {}
unsafe impl Sync for CompiledProgram {}

impl Drop for CompiledProgram {
    fn drop(&mut self) {
        let mut a = args!(PJRT_Executable_Destroy_Args {
            executable: self.raw
        });
        if let Err(e) = pjrt_call!(
            self._topology.plugin,
            PJRT_Executable_Destroy,
            &mut a,
            "destroying compiled executable"
        ) {
            tracing::warn!("{e}");
        }
    }
}

impl CompiledProgram {
    fn plugin(&self) -> &Plugin {
        &self._topology.plugin
    }

    /// Device (and host) memory one device needs to run the program.
    pub fn memory_stats(&self) -> Result<MemoryStats> {
        MemoryStats::of(self.plugin(), self.raw)
    }

    /// XLA's cost analysis (e.g. `flops`, `bytes accessed`), numbers only,
    /// as the plugin names them.
    pub fn cost_analysis(&self) -> Result<Vec<(String, f64)>> {
        let mut a = args!(PJRT_Executable_GetCostAnalysis_Args {
            executable: self.raw
        });
        pjrt_call!(
            self.plugin(),
            PJRT_Executable_GetCostAnalysis,
            &mut a,
            "cost analysis"
        )?;
        if a.num_properties == 0 || a.properties.is_null() {
            return Ok(vec![]);
        }
        // SAFETY: `num_properties` values owned by the executable.
        let props = unsafe { std::slice::from_raw_parts(a.properties, a.num_properties) };
        Ok(props
            .iter()
            .filter_map(|nv| {
                let name = plugin_str(nv.name, nv.name_size);
                // SAFETY: the union member read is the one `type_` names.
                let value = unsafe {
                    match nv.type_ {
                        ffi::PJRT_NamedValue_kFloat => nv.__bindgen_anon_1.float_value as f64,
                        ffi::PJRT_NamedValue_kInt64 => nv.__bindgen_anon_1.int64_value as f64,
                        _ => return None,
                    }
                };
                Some((name, value))
            })
            .collect())
    }
}

/// A Cloud TPU v4 slice by its accelerator type (`v4-32`: 32 TensorCores,
/// 16 chips in megacore mode, one PJRT device per chip, 4 chips per host
/// as 2x2x1) or libtpu's raw topology name (`v4:2x2x4`, in chips).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpuSlice {
    /// What the user asked for (`v4-32` or `v4:2x2x4`).
    pub requested: String,
    /// Chips along x, y, z.
    pub bounds: [i64; 3],
}

/// HBM of one TPU v4 chip.
pub const TPU_V4_HBM_BYTES: i64 = 32 << 30;

impl TpuSlice {
    /// Parses `v4-8` .. `v4-128` (the shapes Cloud TPU gives these types)
    /// or `v4:AxBxC` (chips; every bound a power of two, at least 2x2x1,
    /// the per-host block).
    pub fn parse(s: &str) -> Result<TpuSlice> {
        let ctx = format!("--topology {s}");
        let bounds =
            if let Some(n) = s.strip_prefix("v4-") {
                match n {
                    "8" => [2, 2, 1],
                    "16" => [2, 2, 2],
                    "32" => [2, 2, 4],
                    "64" => [2, 4, 4],
                    "128" => [4, 4, 4],
                    _ => {
                        return Err(Error::new(
                            ctx,
                            "expected v4-8, v4-16, v4-32, v4-64 or v4-128 (TensorCores), or a raw \
                         topology v4:AxBxC (chips)",
                        ))
                    }
                }
            } else if let Some(shape) = s.strip_prefix("v4:") {
                let dims: Vec<Option<i64>> = shape.split('x').map(|d| d.parse().ok()).collect();
                match dims.as_slice() {
                    [Some(a), Some(b), Some(c)]
                        if [*a, *b, *c]
                            .iter()
                            .all(|d| *d >= 1 && (*d as u64).is_power_of_two())
                            && *a >= 2
                            && *b >= 2 =>
                    {
                        [*a, *b, *c]
                    }
                    _ => return Err(Error::new(
                        ctx,
                        "expected v4:AxBxC with powers of two, A and B at least 2 (a host holds \
                         2x2x1 chips), e.g. v4:2x2x4",
                    )),
                }
            } else {
                return Err(Error::new(
                    ctx,
                    "expected a TPU v4 slice: v4-8, v4-16, v4-32, v4-64, v4-128 or v4:AxBxC",
                ));
            };
        Ok(TpuSlice {
            requested: s.to_string(),
            bounds,
        })
    }

    /// libtpu's topology name, e.g. `v4:2x2x4`.
    pub fn topology_name(&self) -> String {
        let [a, b, c] = self.bounds;
        format!("v4:{a}x{b}x{c}")
    }

    /// The options libtpu's `PJRT_TopologyDescription_Create` takes for it.
    pub fn options(&self) -> Vec<(&'static str, NamedValue)> {
        vec![
            ("chip_config_name", NamedValue::Str("megacore".into())),
            ("chips_per_host_bounds", NamedValue::Ints(vec![2, 2, 1])),
        ]
    }

    pub fn chips(&self) -> i64 {
        self.bounds.iter().product()
    }

    pub fn hosts(&self) -> i64 {
        self.chips() / 4
    }

    /// Cloud TPU's accelerator type (`v4-<TensorCores>`).
    pub fn accelerator_type(&self) -> String {
        format!("v4-{}", 2 * self.chips())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_counts_aliased_outputs_once() {
        let s = MemoryStats {
            generated_code: 1,
            arguments: 100,
            outputs: 90,
            aliased: 80,
            temporaries: 20,
            ..Default::default()
        };
        assert_eq!(s.total(), 131);
    }

    #[test]
    fn named_values_point_at_the_options() {
        let opts = [
            ("chip_config_name", NamedValue::Str("megacore".into())),
            ("chips_per_host_bounds", NamedValue::Ints(vec![2, 2, 1])),
        ];
        let nv = named_values(&opts);
        assert_eq!(nv[0].type_, ffi::PJRT_NamedValue_kString);
        assert_eq!(nv[0].value_size, 8);
        assert_eq!(nv[1].type_, ffi::PJRT_NamedValue_kInt64List);
        assert_eq!(nv[1].value_size, 3);
        let ints =
            unsafe { std::slice::from_raw_parts(nv[1].__bindgen_anon_1.int64_array_value, 3) };
        assert_eq!(ints, &[2, 2, 1]);
    }

    #[test]
    fn v4_slices_map_to_topologies() {
        for (t, name, chips, hosts) in [
            ("v4-8", "v4:2x2x1", 4, 1),
            ("v4-16", "v4:2x2x2", 8, 2),
            ("v4-32", "v4:2x2x4", 16, 4),
            ("v4-64", "v4:2x4x4", 32, 8),
            ("v4-128", "v4:4x4x4", 64, 16),
            ("v4:2x2x4", "v4:2x2x4", 16, 4),
        ] {
            let s = TpuSlice::parse(t).unwrap();
            assert_eq!(
                (s.topology_name(), s.chips(), s.hosts()),
                (name.to_string(), chips, hosts),
                "{t}"
            );
        }
        assert_eq!(
            TpuSlice::parse("v4:2x2x4").unwrap().accelerator_type(),
            "v4-32"
        );
        for bad in ["v4-24", "v5e-8", "v4:3x2x1", "v4:1x1x1", "v4:2x2", "v4-"] {
            let e = TpuSlice::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }
}
