//! The PJRT wrapper against the real CPU plugin: transfers, compile and
//! execute of hand-written StableHLO, multi-device collectives, donation,
//! errors carrying the plugin's message, and no leaks over many executions.

mod common;

use std::path::Path;

use half::bf16;
use sharedmoe::runtime::{
    find_plugin, Arg, Backend, Client, CompileOptions, ElementType, NativeType, Plugin,
};

use common::client;

fn round_trip<T: NativeType + PartialEq + std::fmt::Debug>(values: &[T]) {
    let c = client();
    for dev in c.devices() {
        let buf = c
            .buffer_from_host(values, &[values.len() as i64], &dev)
            .unwrap();
        assert_eq!(buf.element_type(), T::TYPE);
        assert_eq!(buf.dims(), vec![values.len() as i64]);
        assert_eq!(buf.device().unwrap().id(), dev.id());
        assert_eq!(buf.to_host::<T>().unwrap(), values);
    }
}

#[test]
fn plugin_api_version_and_devices() {
    let loc = find_plugin(Backend::Cpu, None).unwrap();
    let plugin = Plugin::load(&loc.path).unwrap();
    let (major, minor) = plugin.api_version();
    assert_eq!(major, 0);
    assert!(minor >= 54, "PJRT C API 0.{minor}");
    assert_eq!(client().platform_name(), "cpu");
    let ids: Vec<i32> = client().devices().iter().map(|d| d.id()).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    let local: Vec<i32> = client()
        .devices()
        .iter()
        .map(|d| d.local_hardware_id())
        .collect();
    assert_eq!(local, vec![0, 1, 2, 3]);
}

#[test]
fn host_device_round_trips_are_exact() {
    round_trip(&[1.5f32, -0.0, f32::MAX, f32::MIN_POSITIVE, f32::INFINITY]);
    round_trip(&[
        bf16::from_f32(1.5),
        bf16::from_f32(-3.0e38),
        bf16::from_f32(1e-3),
    ]);
    round_trip(&[std::f64::consts::PI, -1e300, 5e-324]);
    round_trip(&[i32::MIN, -1, 0, i32::MAX]);
    round_trip(&[u32::MAX, 0, 7]);
    round_trip(&[i64::MIN, -1, i64::MAX]);
    round_trip(&[u16::MAX, 0, 31999]);
}

#[test]
fn wrong_host_sizes_and_types_are_errors() {
    let c = client();
    let dev = &c.devices()[0];
    let err = c
        .buffer_from_bytes(&[0u8; 7], ElementType::F32, &[2], dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("7 bytes given, 8 expected"), "{err}");
    let buf = c.buffer_from_host(&[1i32, 2], &[2], dev).unwrap();
    let err = buf.to_host::<f32>().unwrap_err().to_string();
    assert!(err.contains("S32") && err.contains("F32"), "{err}");
}

const ADD: &str = r#"module @add {
  func.func public @main(%a: tensor<2x2xf32>, %b: tensor<2x2xf32>) -> tensor<2x2xf32> {
    %0 = "stablehlo.add"(%a, %b) : (tensor<2x2xf32>, tensor<2x2xf32>) -> tensor<2x2xf32>
    "func.return"(%0) : (tensor<2x2xf32>) -> ()
  }
}"#;

#[test]
fn compile_and_execute_hand_written_module() {
    let c = client();
    let exe = c.compile(ADD, &CompileOptions::default()).unwrap();
    assert_eq!((exe.num_outputs(), exe.num_replicas()), (1, 1));
    let dev = &c.devices()[0];
    let a = c
        .buffer_from_host(&[1f32, 2.0, 3.0, 4.0], &[2, 2], dev)
        .unwrap();
    let b = c
        .buffer_from_host(&[10f32, 20.0, 30.0, 40.0], &[2, 2], dev)
        .unwrap();
    let out = exe.execute(&[&[&a, &b]]).unwrap();
    assert_eq!(
        out[0][0].to_host::<f32>().unwrap(),
        vec![11.0, 22.0, 33.0, 44.0]
    );
    // Inputs stay usable after a borrowed execution.
    assert!(!a.is_deleted());
    let err = exe.execute(&[&[&a]]).unwrap_err().to_string();
    assert!(!err.is_empty());
}

#[test]
fn four_device_all_reduce_from_design_md() {
    let text = r#"module @m attributes {mhlo.num_replicas = 4 : i32, mhlo.num_partitions = 1 : i32} {
  func.func public @main(%a: tensor<4xf32>) -> tensor<4xf32> {
    %0 = "stablehlo.all_reduce"(%a) ({
      ^bb0(%x: tensor<f32>, %y: tensor<f32>):
        %s = "stablehlo.add"(%x, %y) : (tensor<f32>, tensor<f32>) -> tensor<f32>
        "stablehlo.return"(%s) : (tensor<f32>) -> ()
    }) {replica_groups = dense<[[0, 1, 2, 3]]> : tensor<1x4xi64>,
        channel_handle = #stablehlo.channel_handle<handle = 1, type = 0>} : (tensor<4xf32>) -> tensor<4xf32>
    "func.return"(%0) : (tensor<4xf32>) -> ()
  }
}"#;
    let c = client();
    let exe = c.compile(text, &CompileOptions::replicas(4)).unwrap();
    assert_eq!(exe.num_replicas(), 4);
    let bufs: Vec<_> = c
        .devices()
        .iter()
        .enumerate()
        .map(|(r, d)| {
            let v: Vec<f32> = (0..4).map(|i| (r * 10 + i) as f32).collect();
            c.buffer_from_host(&v, &[4], d).unwrap()
        })
        .collect();
    let lists: Vec<Vec<&_>> = bufs.iter().map(|b| vec![b]).collect();
    let refs: Vec<&[&_]> = lists.iter().map(|l| l.as_slice()).collect();
    let out = exe.execute(&refs).unwrap();
    assert_eq!(out.len(), 4);
    for (r, o) in out.iter().enumerate() {
        assert_eq!(
            o[0].to_host::<f32>().unwrap(),
            vec![60.0, 64.0, 68.0, 72.0],
            "replica {r}"
        );
        assert_eq!(o[0].device().unwrap().id(), r as i32);
    }
}

const DONATING: &str = r#"module @donate {
  func.func public @main(%p: tensor<1024xf32> {tf.aliasing_output = 0 : i32}, %d: tensor<1024xf32>) -> tensor<1024xf32> {
    %0 = "stablehlo.subtract"(%p, %d) : (tensor<1024xf32>, tensor<1024xf32>) -> tensor<1024xf32>
    "func.return"(%0) : (tensor<1024xf32>) -> ()
  }
}"#;

#[test]
fn donated_input_is_consumed_and_borrowed_input_survives() {
    let c = client();
    let dev = &c.devices()[0];
    let exe = c.compile(DONATING, &CompileOptions::default()).unwrap();
    let p = c.buffer_from_host(&vec![5f32; 1024], &[1024], dev).unwrap();
    let d = c.buffer_from_host(&vec![1f32; 1024], &[1024], dev).unwrap();
    // Donated: the parameter's memory becomes the output (updated in place).
    let mut p = p;
    for step in 1..=3 {
        let mut out = exe
            .execute_args(vec![vec![Arg::Donated(p), Arg::Borrowed(&d)]])
            .unwrap();
        p = out.remove(0).remove(0);
        assert_eq!(p.to_host::<f32>().unwrap()[0], 5.0 - step as f32);
    }
    // Borrowed where the program declares donation: PJRT is told the input
    // is not donatable, so the caller's buffer stays valid.
    let out = exe.execute(&[&[&p, &d]]).unwrap();
    assert!(!p.is_deleted());
    assert_eq!(p.to_host::<f32>().unwrap()[0], 2.0);
    assert_eq!(out[0][0].to_host::<f32>().unwrap()[0], 1.0);
}

#[test]
fn donation_reuses_the_input_allocation() {
    let c = client();
    let dev = &c.devices()[0];
    let exe = c.compile(DONATING, &CompileOptions::default()).unwrap();
    let d = c.buffer_from_host(&vec![1f32; 1024], &[1024], dev).unwrap();
    let p = c.buffer_from_host(&vec![3f32; 1024], &[1024], dev).unwrap();
    let input_address = p.device_address().unwrap();
    let out = exe
        .execute_args(vec![vec![Arg::Donated(p), Arg::Borrowed(&d)]])
        .unwrap();
    assert_eq!(
        out[0][0].device_address().unwrap(),
        input_address,
        "donated memory was not reused"
    );
    assert_eq!(out[0][0].to_host::<f32>().unwrap()[1023], 2.0);
    // Without donation the output gets fresh memory.
    let q = c.buffer_from_host(&vec![3f32; 1024], &[1024], dev).unwrap();
    let out = exe.execute(&[&[&q, &d]]).unwrap();
    assert_ne!(
        out[0][0].device_address().unwrap(),
        q.device_address().unwrap()
    );
}

#[test]
fn malformed_mlir_reports_the_plugin_parse_error() {
    let err = client()
        .compile("module { func.func @main( }", &CompileOptions::default())
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("compiling StableHLO module"), "{text}");
    assert!(text.contains("error:"), "plugin message missing: {text}");
    assert!(err.code.is_some(), "plugin error code missing: {text}");
}

#[test]
fn missing_plugin_is_a_clear_error() {
    let err = find_plugin(
        Backend::Cpu,
        Some(Path::new("/nonexistent/xla_cpu_pjrt.so")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("/nonexistent/xla_cpu_pjrt.so") && err.contains("xla-cpu-pjrt"),
        "{err}"
    );
    let err = Plugin::load(Path::new("/nonexistent/libfoo.so"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/nonexistent/libfoo.so") && err.contains("does not exist"),
        "{err}"
    );
    // A file that is not a shared library.
    let not_so =
        std::env::temp_dir().join(format!("sharedmoe-not-a-plugin-{}.so", std::process::id()));
    std::fs::write(&not_so, b"hello").unwrap();
    let err = Plugin::load(&not_so).unwrap_err().to_string();
    std::fs::remove_file(&not_so).unwrap();
    assert!(err.contains("sharedmoe-not-a-plugin"), "{err}");
}

#[test]
fn tpu_client_is_refused_without_tpu_devices() {
    if sharedmoe::runtime::tpu_present() {
        return; // on a TPU VM the client may legitimately be created
    }
    // Any library named libtpu* is guarded before client creation; use a
    // copy of the CPU plugin under that name so no network is touched.
    let cpu = find_plugin(Backend::Cpu, None).unwrap().path;
    let dir = std::env::temp_dir().join(format!("sharedmoe-fake-tpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("libtpu.so");
    std::fs::copy(&cpu, &fake).unwrap();
    let plugin = Plugin::load(&fake).unwrap();
    let err = Client::new(plugin, &[], None).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains("no TPU device"), "{err}");
}

/// An in-memory key-value store, as the coordinator will serve over gRPC.
#[derive(Default)]
struct MemoryStore(std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>);

impl sharedmoe::runtime::KeyValueStore for MemoryStore {
    fn put(&self, key: &str, value: &[u8]) -> sharedmoe::runtime::Result<()> {
        self.0
            .lock()
            .unwrap()
            .insert(key.to_string(), value.to_vec());
        Ok(())
    }
    fn get(&self, key: &str, _timeout: std::time::Duration) -> sharedmoe::runtime::Result<Vec<u8>> {
        Ok(self.0.lock().unwrap().get(key).cloned().unwrap_or_default())
    }
}

#[test]
fn client_accepts_a_key_value_store_and_options() {
    use sharedmoe::runtime::NamedValue;
    let loc = find_plugin(Backend::Cpu, None).unwrap();
    let plugin = Plugin::load(&loc.path).unwrap();
    let store = std::sync::Arc::new(MemoryStore::default());
    let c = Client::new(
        plugin,
        &[("cpu_device_count", NamedValue::Int(2))],
        Some(store),
    )
    .unwrap();
    assert_eq!(c.devices().len(), 2);
    let exe = c.compile(ADD, &CompileOptions::default()).unwrap();
    let a = c
        .buffer_from_host(&[1f32; 4], &[2, 2], &c.devices()[0])
        .unwrap();
    let out = exe.execute(&[&[&a, &a]]).unwrap();
    assert_eq!(out[0][0].to_host::<f32>().unwrap(), vec![2.0; 4]);
}
