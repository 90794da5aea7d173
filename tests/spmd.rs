//! Which sharding dialect the shipped CPU plugin's SPMD partitioner takes
//! (issue 17's first check): one program of 1 replica x 4 partitions over
//! 4 CPU devices, its argument sharded by rows, a replicated and a sharded
//! result. GSPMD's `mhlo.sharding` strings and Shardy's `sdy.sharding`
//! attributes are both tried.
//!
//! Found on xla-cpu-pjrt 0.0.1: both partition correctly. GSPMD logs that
//! its sharding propagation is to be deprecated in favour of Shardy.
//! Shardy needs `use_shardy_partitioner` (ExecutableBuildOptionsProto field
//! 19) in the compile options: without it XLA stops at a RET_CHECK that an
//! `xla.sdy.*` custom call reached the GSPMD partitioner ("lowered
//! targeting Shardy, but Shardy was then disabled"). libtpu 0.0.52 is not
//! checked here yet (it needs the offline TPU compile path).

use sharedmoe::runtime::{Buffer, Client, CompileOptions};

const DEVICES: usize = 4;

/// x [8, 2] f32 sharded by rows over the 4 devices -> (sum of x^2
/// replicated, x^2 sharded like x), with the sharding attributes given.
fn module(head: &str, arg: &str, replicated: &str, sharded: &str) -> String {
    format!(
        r#"module @probe attributes {{mhlo.num_partitions = 4 : i32, mhlo.num_replicas = 1 : i32}} {{
{head}
  func.func public @main(%arg0: tensor<8x2xf32> {{{arg}}}) -> (tensor<f32> {{{replicated}}}, tensor<8x2xf32> {{{sharded}}}) {{
    %0 = stablehlo.multiply %arg0, %arg0 : tensor<8x2xf32>
    %cst = stablehlo.constant dense<0.000000e+00> : tensor<f32>
    %1 = stablehlo.reduce(%0 init: %cst) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x2xf32>, tensor<f32>) -> tensor<f32>
    return %1, %0 : tensor<f32>, tensor<8x2xf32>
  }}
}}
"#
    )
}

/// Compiles `mlir` as one SPMD program over 4 CPU devices and runs it on
/// x = 0..16 (row-major), each device holding its 2 rows. Returns per
/// device (the replicated sum, its x^2 shard).
fn run(mlir: &str, shardy: bool) -> Result<Vec<(f32, Vec<f32>)>, String> {
    let client = Client::cpu(DEVICES).map_err(|e| e.to_string())?;
    let options = CompileOptions {
        use_shardy_partitioner: shardy,
        ..CompileOptions::spmd(DEVICES)
    };
    let exe = client.compile(mlir, &options).map_err(|e| format!("{e}"))?;
    let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let shards: Vec<Buffer> = exe
        .devices()
        .iter()
        .enumerate()
        .map(|(i, dev)| client.buffer_from_host(&x[i * 4..(i + 1) * 4], &[2, 2], dev))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let lists: Vec<Vec<&Buffer>> = shards.iter().map(|b| vec![b]).collect();
    let refs: Vec<&[&Buffer]> = lists.iter().map(Vec::as_slice).collect();
    let out = exe.execute(&refs).map_err(|e| e.to_string())?;
    out.iter()
        .map(|o| {
            let sum = o[0].to_host::<f32>().map_err(|e| e.to_string())?[0];
            let part = o[1].to_host::<f32>().map_err(|e| e.to_string())?;
            Ok((sum, part))
        })
        .collect()
}

/// What a correct partitioning gives: sum of squares 0..16 = 1240 on every
/// device, and each device's own rows squared.
fn check(results: &[(f32, Vec<f32>)]) {
    assert_eq!(results.len(), DEVICES);
    for (i, (sum, part)) in results.iter().enumerate() {
        assert_eq!(*sum, 1240.0, "device {i}: the replicated sum");
        let want: Vec<f32> = (i * 4..(i + 1) * 4).map(|v| (v * v) as f32).collect();
        assert_eq!(part, &want, "device {i}: its shard");
    }
}

#[test]
fn gspmd_sharding_strings_partition_on_the_cpu_plugin() {
    let mlir = module(
        "",
        r#"mhlo.sharding = "{devices=[4,1]<=[4]}""#,
        r#"mhlo.sharding = "{replicated}""#,
        r#"mhlo.sharding = "{devices=[4,1]<=[4]}""#,
    );
    check(&run(&mlir, false).unwrap_or_else(|e| panic!("GSPMD: {e}\n{mlir}")));
}

#[test]
fn shardy_sharding_attributes_on_the_cpu_plugin() {
    let mlir = module(
        r#"  sdy.mesh @mesh = <["x"=4]>"#,
        r#"sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>"#,
        r#"sdy.sharding = #sdy.sharding<@mesh, []>"#,
        r#"sdy.sharding = #sdy.sharding<@mesh, [{"x"}, {}]>"#,
    );
    check(&run(&mlir, true).unwrap_or_else(|e| panic!("Shardy: {e}\n{mlir}")));
}

mod manual {
    //! Manually partitioned regions (`to_manual` / `from_manual`, JAX's
    //! shard_map), the shared MoE's per-device path: values and gradients
    //! against the same function computed whole on one device.

    use sharedmoe::graph::{grad, DType, Graph, HostTensor, Mesh, Sharding, Tensor, TensorType};
    use sharedmoe::runtime::Client;

    const N: usize = 4;

    /// f(x [8, 2], w [2, 3]) = per device d: s_d = sum((x_d @ w)^2) over
    /// its 2 rows; the result is mean_d s_d^2 (a per-device nonlinearity,
    /// so a wrong grouping changes it) and its gradients.
    fn trace(mesh: Option<&Mesh>) -> (Graph, Vec<Tensor>) {
        let g = Graph::new();
        let x = g.param("x", TensorType::new(DType::F32, &[8, 2])).unwrap();
        let w = g.param("w", TensorType::new(DType::F32, &[2, 3])).unwrap();
        let per_device = |x: &Tensor, w: &Tensor| -> Tensor {
            let y = x.matmul(w).unwrap();
            y.mul(&y).unwrap().sum_all().unwrap()
        };
        let s = match mesh {
            Some(m) => {
                let rows = Sharding::split(m, 2, 0, &["x"]).unwrap();
                let whole = Sharding::replicated(m, 2);
                let one = Sharding::split(m, 1, 0, &["x"]).unwrap();
                let s = per_device(&x.to_manual(&rows).unwrap(), &w.to_manual(&whole).unwrap());
                s.broadcast_to(&[1]).unwrap().from_manual(&one).unwrap()
            }
            None => {
                let parts: Vec<Tensor> = (0..N as i64)
                    .map(|d| {
                        let xd = x.slice(&[2 * d, 0], &[2 * d + 2, 2], &[1, 1]).unwrap();
                        per_device(&xd, &w).reshape(&[1]).unwrap()
                    })
                    .collect();
                let refs: Vec<&Tensor> = parts.iter().collect();
                sharedmoe::graph::concatenate(&refs, 0).unwrap()
            }
        };
        let loss = s.mul(&s).unwrap().mean(&[0]).unwrap();
        let grads = grad(&loss, &[&x, &w]).unwrap();
        (g, vec![loss, grads[0].clone(), grads[1].clone()])
    }

    #[test]
    fn a_manual_region_computes_per_device_with_its_gradients() {
        let x: Vec<f64> = (0..16).map(|v| (v as f64 - 7.5) / 8.0).collect();
        let w: Vec<f64> = (0..6).map(|v| (v as f64 - 2.0) / 3.0).collect();
        let inputs = |xs: Vec<f64>| {
            vec![
                HostTensor::from_f64(&xs, TensorType::new(DType::F32, &[8, 2])).unwrap(),
                HostTensor::from_f64(&w, TensorType::new(DType::F32, &[2, 3])).unwrap(),
            ]
        };
        let (g, outs) = trace(None);
        let refs: Vec<&Tensor> = outs.iter().collect();
        let one = Client::cpu(1).unwrap();
        let want = g
            .build(&refs)
            .unwrap()
            .compile(&one)
            .unwrap()
            .run(&one, &inputs(x.clone()))
            .unwrap();

        let mesh = Mesh::line("x", N).unwrap();
        let (g, outs) = trace(Some(&mesh));
        let refs: Vec<&Tensor> = outs.iter().collect();
        let rows = Sharding::split(&mesh, 2, 0, &["x"]).unwrap();
        let program = g
            .build(&refs)
            .unwrap()
            .partitioned(
                &mesh,
                vec![rows.clone(), Sharding::replicated(&mesh, 2)],
                vec![
                    Sharding::replicated(&mesh, 0),
                    rows,
                    Sharding::replicated(&mesh, 2),
                ],
            )
            .unwrap();
        let four = Client::cpu(N).unwrap();
        let compiled = program
            .compile(&four)
            .unwrap_or_else(|e| panic!("{e}\n{}", program.to_mlir().unwrap()));
        let per_device: Vec<Vec<HostTensor>> = (0..N)
            .map(|d| {
                let block = TensorType::new(DType::F32, &[2, 2]);
                vec![
                    HostTensor::from_f64(&x[4 * d..4 * d + 4], block).unwrap(),
                    inputs(x.clone()).remove(1),
                ]
            })
            .collect();
        let got = compiled.run_replicated(&four, &per_device).unwrap();
        for (d, outs) in got.iter().enumerate() {
            let close = |a: &[f64], b: &[f64], what: &str| {
                for (u, v) in a.iter().zip(b) {
                    assert!(
                        (u - v).abs() <= 1e-5 * v.abs().max(1.0),
                        "device {d} {what}: {a:?} vs {b:?}"
                    );
                }
            };
            close(&outs[0].to_f64(), &want[0].to_f64(), "loss");
            close(
                &outs[1].to_f64(),
                &want[1].to_f64()[4 * d..4 * d + 4],
                "d/dx block",
            );
            close(
                &outs[2].to_f64(),
                &want[2].to_f64(),
                "d/dw (summed over the devices)",
            );
        }
    }
}
