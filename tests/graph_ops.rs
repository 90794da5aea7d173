//! Forward values of every op on the real CPU plugin against hand-computed
//! or closed-form values, plus trace-time error messages.

mod common;

use common::{assert_close, eval, eval_host, f32t, f64t};
use sharedmoe::graph::{concatenate, DType, DotDims, Graph, TensorType};

fn i32t(dims: &[i64]) -> TensorType {
    TensorType::new(DType::I32, dims)
}

#[test]
fn unary_math_matches_closed_forms() {
    let x = vec![0.25, 1.0, 2.0, 4.0];
    let out = eval(&[(f64t(&[4]), x.clone())], |_, p| {
        let x = &p[0];
        Ok(vec![
            x.neg()?,
            x.exp()?,
            x.log()?,
            x.rsqrt()?,
            x.sqrt()?,
            x.tanh()?,
            x.logistic()?,
            x.sin()?,
            x.cos()?,
        ])
    });
    let f: [fn(f64) -> f64; 9] = [
        |v| -v,
        f64::exp,
        f64::ln,
        |v| 1.0 / v.sqrt(),
        f64::sqrt,
        f64::tanh,
        |v| 1.0 / (1.0 + (-v).exp()),
        f64::sin,
        f64::cos,
    ];
    for (k, func) in f.iter().enumerate() {
        let want: Vec<f64> = x.iter().map(|&v| func(v)).collect();
        assert_close(&out[k], &want, 1e-14, &format!("unary op {k}"));
    }
    let y = vec![-1.5, -0.0, 0.5, 2.7];
    let out = eval(&[(f32t(&[4]), y)], |_, p| {
        Ok(vec![p[0].abs()?, p[0].floor()?, p[0].sign()?])
    });
    assert_eq!(out[0], vec![1.5, 0.0, 0.5, 2.700000047683716]);
    assert_eq!(out[1], vec![-2.0, -0.0, 0.0, 2.0]);
    assert_eq!(out[2], vec![-1.0, 0.0, 1.0, 1.0]);
}

#[test]
fn binary_arithmetic_and_broadcasting() {
    let a = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
    let b = vec![10.0, 20.0, 30.0]; // [3]
    let out = eval(&[(f32t(&[2, 3]), a), (f32t(&[3]), b)], |_, p| {
        let (a, b) = (&p[0], &p[1]);
        Ok(vec![
            a.add(b)?,
            a.sub(b)?,
            a.mul(b)?,
            b.div(a)?,
            a.maximum(&b.mul_scalar(0.1)?)?,
            a.minimum(&b.mul_scalar(0.1)?)?,
        ])
    });
    assert_eq!(out[0], vec![11.0, 22.0, 33.0, 14.0, 25.0, 36.0]);
    assert_eq!(out[1], vec![-9.0, -18.0, -27.0, -6.0, -15.0, -24.0]);
    assert_eq!(out[2], vec![10.0, 40.0, 90.0, 40.0, 100.0, 180.0]);
    assert_eq!(out[3], vec![10.0, 10.0, 10.0, 2.5, 4.0, 5.0]);
    assert_eq!(out[4], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(out[5], vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    let out = eval(
        &[
            (f64t(&[3]), vec![2.0, 9.0, 0.5]),
            (f64t(&[3]), vec![3.0, 0.5, -1.0]),
        ],
        |_, p| Ok(vec![p[0].pow(&p[1])?]),
    );
    assert_close(&out[0], &[8.0, 3.0, 2.0], 1e-15, "pow");
}

#[test]
fn comparisons_select_and_logic() {
    let out = eval(
        &[
            (i32t(&[4]), vec![1.0, 2.0, 3.0, 4.0]),
            (i32t(&[4]), vec![4.0, 2.0, 1.0, 5.0]),
        ],
        |_, p| {
            let (a, b) = (&p[0], &p[1]);
            let lt = a.lt(b)?;
            Ok(vec![
                a.eq(b)?,
                a.ne(b)?,
                lt.clone(),
                a.le(b)?,
                a.gt(b)?,
                a.ge(b)?,
                lt.select(a, b)?,
                lt.and(&a.ge(&a.scalar_like(2.0)?)?)?,
                lt.or(&a.eq(b)?)?.not()?,
            ])
        },
    );
    assert_eq!(out[0], vec![0.0, 1.0, 0.0, 0.0]);
    assert_eq!(out[1], vec![1.0, 0.0, 1.0, 1.0]);
    assert_eq!(out[2], vec![1.0, 0.0, 0.0, 1.0]);
    assert_eq!(out[3], vec![1.0, 1.0, 0.0, 1.0]);
    assert_eq!(out[4], vec![0.0, 0.0, 1.0, 0.0]);
    assert_eq!(out[5], vec![0.0, 1.0, 1.0, 0.0]);
    assert_eq!(out[6], vec![1.0, 2.0, 1.0, 4.0]);
    assert_eq!(out[7], vec![0.0, 0.0, 0.0, 1.0]);
    assert_eq!(out[8], vec![0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn convert_rounds_and_truncates() {
    let out = eval_host(
        &[(f32t(&[4]), vec![1.0 + 1.0 / 256.0, -2.7, 3.5, 1e10])],
        |_, p| {
            Ok(vec![
                p[0].convert(DType::BF16)?,
                p[0].convert(DType::I32)?,
                p[0].convert(DType::F64)?,
            ])
        },
    );
    assert_eq!(out[0].ty, TensorType::new(DType::BF16, &[4]));
    // bf16 has 8 significant bits: 1 + 2^-8 rounds to even (1.0).
    assert_eq!(out[0].to_f64()[..3], [1.0, -2.703125, 3.5]);
    assert_eq!(out[1].to_f64()[..3], [1.0, -2.0, 3.0]);
    assert_eq!(out[2].to_f64()[1], -2.700000047683716);
}

#[test]
fn constants_iota_and_dtypes_round_trip() {
    let out = eval_host(&[], |g, _| {
        Ok(vec![
            g.constant(&[1.0, -2.0, 3.5, 0.0, 5.0, 6.0], f32t(&[2, 3]))?,
            g.full(7.0, TensorType::new(DType::U32, &[2]))?,
            g.iota(i32t(&[2, 3]), 1)?,
            g.iota(TensorType::new(DType::F64, &[2, 2]), 0)?,
            g.scalar(f64::NEG_INFINITY, DType::F32)?,
            g.constant(&[1.0, 0.0, 1.0], TensorType::new(DType::Bool, &[3]))?,
            g.constant(&[-3.0, 65535.0], TensorType::new(DType::U16, &[2]))?,
            g.constant(&[-(1i64 << 40) as f64], TensorType::new(DType::I64, &[1]))?,
        ])
    });
    assert_eq!(out[0].to_f64(), vec![1.0, -2.0, 3.5, 0.0, 5.0, 6.0]);
    assert_eq!(out[1].to_f64(), vec![7.0, 7.0]);
    assert_eq!(out[2].to_f64(), vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
    assert_eq!(out[3].to_f64(), vec![0.0, 0.0, 1.0, 1.0]);
    assert_eq!(out[4].to_f64(), vec![f64::NEG_INFINITY]);
    assert_eq!(out[5].to_f64(), vec![1.0, 0.0, 1.0]);
    assert_eq!(out[6].to_f64(), vec![0.0, 65535.0]);
    assert_eq!(out[7].to_f64(), vec![-(1i64 << 40) as f64]);
}

#[test]
fn shape_ops_move_the_right_elements() {
    let x: Vec<f64> = (0..24).map(f64::from).collect(); // [2, 3, 4]
    let out = eval(&[(f32t(&[2, 3, 4]), x)], |g, p| {
        let x = &p[0];
        let pv = g.scalar(-1.0, DType::F32)?;
        Ok(vec![
            x.reshape(&[4, -1])?.slice(&[1, 0], &[3, 6], &[1, 5])?,
            x.transpose(&[2, 0, 1])?
                .slice(&[1, 0, 0], &[2, 2, 3], &[1, 1, 1])?,
            x.slice(&[1, 0, 1], &[2, 3, 4], &[1, 2, 2])?,
            concatenate(&[&x.slice_axis(2, 0, 1)?, &x.slice_axis(2, 3, 4)?], 2)?.reshape(&[-1])?,
            x.slice(&[0, 0, 0], &[1, 1, 2], &[1, 1, 1])?
                .reshape(&[2])?
                .pad(&pv, &[1], &[2], &[1])?,
            x.slice(&[0, 0, 0], &[1, 1, 2], &[1, 1, 1])?
                .reshape(&[1, 2])?
                .broadcast_in_dim(&[3, 2], &[0, 1])?,
            g.constant(&[5.0], f32t(&[2]))?
                .broadcast_in_dim(&[2, 3], &[0])?,
        ])
    });
    assert_eq!(out[0], vec![6.0, 11.0, 12.0, 17.0]);
    // transpose: t[c, a, b] = x[a, b, c]; slice c = 1, a in 0..2, b in 0..3
    assert_eq!(out[1], vec![1.0, 5.0, 9.0, 13.0, 17.0, 21.0]);
    assert_eq!(out[2], vec![13.0, 15.0, 21.0, 23.0]);
    assert_eq!(
        out[3],
        vec![0.0, 3.0, 4.0, 7.0, 8.0, 11.0, 12.0, 15.0, 16.0, 19.0, 20.0, 23.0]
    );
    assert_eq!(out[4], vec![-1.0, 0.0, -1.0, 1.0, -1.0, -1.0]);
    assert_eq!(out[5], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    assert_eq!(out[6], vec![5.0; 6]);
}

#[test]
fn dynamic_slice_and_update_clamp_like_stablehlo() {
    let x: Vec<f64> = (0..12).map(f64::from).collect(); // [3, 4]
    let out = eval(
        &[
            (f32t(&[3, 4]), x),
            (i32t(&[]), vec![1.0]),
            (i32t(&[]), vec![3.0]),
        ],
        |g, p| {
            let (x, i, j) = (&p[0], &p[1], &p[2]);
            let upd = g.constant(&[-1.0, -2.0], f32t(&[1, 2]))?;
            Ok(vec![
                x.dynamic_slice(&[i, j], &[2, 2])?,
                x.dynamic_update_slice(&upd, &[i, i])?,
            ])
        },
    );
    // j = 3 with size 2 clamps to start 2.
    assert_eq!(out[0], vec![6.0, 7.0, 10.0, 11.0]);
    assert_eq!(
        out[1],
        vec![0.0, 1.0, 2.0, 3.0, 4.0, -1.0, -2.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    );
}

#[test]
fn dot_general_with_batch_and_contracting_dims() {
    let a: Vec<f64> = (1..=12).map(f64::from).collect(); // [2, 2, 3]
    let b: Vec<f64> = (1..=12).map(f64::from).collect(); // [2, 3, 2]
    let out = eval(&[(f32t(&[2, 2, 3]), a), (f32t(&[2, 3, 2]), b)], |_, p| {
        let dims = DotDims {
            lhs_contract: vec![2],
            rhs_contract: vec![1],
            lhs_batch: vec![0],
            rhs_batch: vec![0],
        };
        Ok(vec![p[0].dot_general(&p[1], &dims)?, p[0].matmul(&p[1])?])
    });
    // batch 0: [[1,2,3],[4,5,6]] @ [[1,2],[3,4],[5,6]] = [[22,28],[49,64]]
    // batch 1: [[7,8,9],[10,11,12]] @ [[7,8],[9,10],[11,12]] = [[220,244],[301,334]]
    let want = vec![22.0, 28.0, 49.0, 64.0, 220.0, 244.0, 301.0, 334.0];
    assert_eq!(out[0], want);
    assert_eq!(out[1], want);
    // bf16 operands accumulating into f32, and a PyTorch-layout linear.
    let out = eval(
        &[
            (TensorType::new(DType::BF16, &[1, 2]), vec![1.5, 2.0]),
            (
                TensorType::new(DType::BF16, &[3, 2]),
                vec![1.0, 1.0, 2.0, 0.5, -1.0, 4.0],
            ),
        ],
        |_, p| {
            let dims = DotDims {
                lhs_contract: vec![1],
                rhs_contract: vec![1],
                ..Default::default()
            };
            Ok(vec![
                p[0].dot_general_as(&p[1], &dims, DType::F32)?,
                p[0].linear(&p[1])?.convert(DType::F32)?,
            ])
        },
    );
    assert_eq!(out[0], vec![3.5, 4.0, 6.5]);
    assert_eq!(out[1], vec![3.5, 4.0, 6.5]);
}

#[test]
fn reductions_and_softmax() {
    let x = vec![1.0, 5.0, 3.0, -2.0, 0.0, 4.0]; // [2, 3]
    let out = eval(&[(f64t(&[2, 3]), x)], |_, p| {
        let x = &p[0];
        Ok(vec![
            x.reduce_sum(&[1])?,
            x.reduce_sum(&[0])?,
            x.reduce_max(&[1])?,
            x.reduce_min(&[0, 1])?.reshape(&[1])?,
            x.mean_all()?.reshape(&[1])?,
            x.softmax(-1)?,
            x.logsumexp(1)?,
        ])
    });
    assert_eq!(out[0], vec![9.0, 2.0]);
    assert_eq!(out[1], vec![-1.0, 5.0, 7.0]);
    assert_eq!(out[2], vec![5.0, 4.0]);
    assert_eq!(out[3], vec![-2.0]);
    assert_close(&out[4], &[11.0 / 6.0], 1e-15, "mean");
    let row = |v: [f64; 3]| {
        let z: f64 = v.iter().map(|a| a.exp()).sum();
        (v.map(|a| a.exp() / z), z.ln())
    };
    let ((s0, l0), (s1, l1)) = (row([1.0, 5.0, 3.0]), row([-2.0, 0.0, 4.0]));
    assert_close(&out[5], &[s0, s1].concat(), 1e-15, "softmax");
    assert_close(&out[6], &[l0, l1], 1e-15, "logsumexp");
}

#[test]
fn reduce_over_large_values_is_stable() {
    let out = eval(&[(f32t(&[1, 3]), vec![1000.0, 1000.0, -1000.0])], |_, p| {
        Ok(vec![p[0].softmax(1)?, p[0].logsumexp(1)?])
    });
    assert_eq!(out[0], vec![0.5, 0.5, 0.0]);
    assert_close(&out[1], &[1000.0 + 2f64.ln()], 1e-7, "logsumexp");
}

#[test]
fn top_k_and_argmax() {
    let x = vec![0.1, 0.7, 0.2, 0.7, 3.0, -1.0, 2.0, 2.5]; // [2, 4]
    let out = eval(&[(f32t(&[2, 4]), x)], |_, p| {
        let (v, i) = p[0].top_k(2)?;
        Ok(vec![v, i, p[0].argmax(1)?, p[0].argmax(0)?])
    });
    assert_close(&out[0], &[0.7, 0.7, 3.0, 2.5], 1e-7, "top-2 values");
    assert_eq!(
        out[1],
        vec![1.0, 3.0, 0.0, 3.0],
        "ties go to the lower index"
    );
    assert_eq!(out[2], vec![1.0, 0.0]);
    assert_eq!(out[3], vec![1.0, 0.0, 1.0, 1.0]);
}

#[test]
fn gather_rows_and_scatter_add() {
    let table: Vec<f64> = (0..8).map(f64::from).collect(); // [4, 2]
    let out = eval(
        &[
            (f32t(&[4, 2]), table),
            (i32t(&[2, 2]), vec![3.0, 0.0, 3.0, 1.0]),
        ],
        |g, p| {
            let (t, idx) = (&p[0], &p[1]);
            let upd = g.constant(
                &[1.0, 1.0, 10.0, 10.0, 100.0, 100.0, 1000.0, 1000.0],
                f32t(&[2, 2, 2]),
            )?;
            Ok(vec![t.take(idx)?, t.scatter_add(idx, &upd)?])
        },
    );
    assert_eq!(out[0], vec![6.0, 7.0, 0.0, 1.0, 6.0, 7.0, 2.0, 3.0]);
    assert_eq!(
        out[1],
        vec![10.0, 11.0, 1002.0, 1003.0, 4.0, 5.0, 107.0, 108.0]
    );
}

#[test]
fn while_loop_counts_and_captures() {
    // sum_{i<5} (i * w) with w captured from outside the loop.
    let out = eval(&[(f32t(&[2]), vec![1.0, -2.0])], |g, p| {
        let w = &p[0];
        let i0 = g.scalar(0.0, DType::I32)?;
        let acc0 = g.zeros(f32t(&[2]))?;
        let limit = g.scalar(5.0, DType::I32)?;
        let outs = g.while_loop(
            &[&i0, &acc0],
            |s| s[0].lt(&limit),
            |s| {
                let i = s[0].convert(DType::F32)?;
                Ok(vec![s[0].add_scalar(1.0)?, s[1].add(&w.mul(&i)?)?])
            },
        )?;
        Ok(outs)
    });
    assert_eq!(out[0], vec![5.0]);
    assert_eq!(out[1], vec![10.0, -20.0]);
}

#[test]
fn nested_while_loops_capture_through_two_levels() {
    let out = eval(&[(f32t(&[]), vec![0.5])], |g, p| {
        let w = &p[0];
        let outer = g.while_loop(
            &[&g.scalar(0.0, DType::I32)?, &g.scalar(0.0, DType::F32)?],
            |s| s[0].lt(&s[0].scalar_like(3.0)?),
            |s| {
                let inner = g.while_loop(
                    &[&g.scalar(0.0, DType::I32)?, &s[1]],
                    |t| t[0].lt(&t[0].scalar_like(4.0)?),
                    |t| Ok(vec![t[0].add_scalar(1.0)?, t[1].add(w)?]),
                )?;
                Ok(vec![s[0].add_scalar(1.0)?, inner[1].clone()])
            },
        )?;
        Ok(vec![outer[1].clone()])
    });
    assert_eq!(out[0], vec![6.0]);
}

#[test]
fn all_reduce_sums_over_four_replicas() {
    let g = Graph::new();
    let x = g.param("x", f32t(&[3])).unwrap();
    let r = g.replica_id().unwrap().convert(DType::F32).unwrap();
    let y = x
        .mul(&r.add_scalar(1.0).unwrap())
        .unwrap()
        .all_reduce_sum()
        .unwrap();
    let f = g.build(&[&y]).unwrap().with_replicas(4);
    let compiled = f.compile(common::client()).unwrap();
    let inputs: Vec<Vec<sharedmoe::graph::HostTensor>> = (0..4)
        .map(|_| {
            vec![sharedmoe::graph::HostTensor::from_f64(&[1.0, 2.0, 3.0], f32t(&[3])).unwrap()]
        })
        .collect();
    let outs = compiled.run_replicated(common::client(), &inputs).unwrap();
    // sum over r of x * (r + 1) = 10 x on every replica.
    for out in outs {
        assert_eq!(out[0].to_f64(), vec![10.0, 20.0, 30.0]);
    }
}

// ---------------------------------------------------------------- trace-time errors

#[test]
fn shape_mismatches_are_caught_at_trace_time() {
    let g = Graph::new();
    let a = g.param("a", f32t(&[4, 8])).unwrap();
    let b = g.param("b", f32t(&[7, 3])).unwrap();
    let err = a.matmul(&b).unwrap_err().to_string();
    assert!(
        err.starts_with("dot_general:") && err.contains("f32[4, 8]") && err.contains("f32[7, 3]"),
        "{err}"
    );
    let err = a.add(&b).unwrap_err().to_string();
    assert!(
        err.contains("add") && err.contains("[4, 8]") && err.contains("[7, 3]"),
        "{err}"
    );
    let c = g.param("c", TensorType::new(DType::BF16, &[4, 8])).unwrap();
    let err = a.add(&c).unwrap_err().to_string();
    assert!(err.contains("f32[4, 8] vs bf16[4, 8]"), "{err}");
    let err = a.reshape(&[5, 7]).unwrap_err().to_string();
    assert!(err.contains("reshape") && err.contains("[5, 7]"), "{err}");
    let err = a.slice(&[0, 0], &[5, 8], &[1, 1]).unwrap_err().to_string();
    assert!(
        err.contains("slice") && err.contains("dimension 0"),
        "{err}"
    );
    let err = a.top_k(9).unwrap_err().to_string();
    assert!(err.contains("top_k"), "{err}");
    let err = a.reduce_sum(&[2]).unwrap_err().to_string();
    assert!(err.contains("axis 2 is out of range for rank 2"), "{err}");
    let err = a.take(&b).unwrap_err().to_string();
    assert!(err.contains("take: indices must be integers"), "{err}");
    let err = a
        .log()
        .and_then(|l| l.exp())
        .and_then(|e| e.transpose(&[0, 0]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("transpose"), "{err}");
}

#[test]
fn misuse_of_the_tracer_is_an_error() {
    let g = Graph::new();
    let h = Graph::new();
    let a = g.param("a", f32t(&[2])).unwrap();
    let b = h.param("b", f32t(&[2])).unwrap();
    assert!(a
        .add(&b)
        .unwrap_err()
        .to_string()
        .contains("different graph"));
    // A value made inside a loop body cannot escape it.
    let mut leaked = None;
    g.while_loop(
        &[&a],
        |s| s[0].reduce_sum(&[0])?.lt(&g.scalar(0.0, DType::F32)?),
        |s| {
            leaked = Some(s[0].exp()?);
            Ok(vec![s[0].clone()])
        },
    )
    .unwrap();
    let err = leaked.unwrap().add(&a).unwrap_err().to_string();
    assert!(err.contains("inside a loop body"), "{err}");
    let err = sharedmoe::graph::grad(&a, &[&a]).unwrap_err().to_string();
    assert!(err.contains("loss must be a float scalar"), "{err}");
}

#[test]
fn malformed_program_reports_the_plugin_message() {
    let err = match common::client().compile("module { this is not mlir }", &Default::default()) {
        Ok(_) => panic!("malformed MLIR compiled"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.to_lowercase().contains("expected") || err.contains("parse"),
        "{err}"
    );
}

#[test]
fn traced_donation_updates_parameters_in_place() {
    use sharedmoe::runtime::Arg;
    let g = Graph::new();
    let w = g.param("w", f32t(&[256])).unwrap();
    let x = g.param("x", f32t(&[256])).unwrap();
    let loss = w.mul(&x).unwrap().sum_all().unwrap();
    let dw = sharedmoe::graph::grad(&loss, &[&w]).unwrap().remove(0);
    let new_w = w.sub(&dw.mul_scalar(0.5).unwrap()).unwrap();
    let f = g.build(&[&loss, &new_w]).unwrap().donate(&[0]).unwrap();
    let text = f.to_mlir().unwrap();
    assert!(text.contains("{tf.aliasing_output = 1 : i32}"), "{text}");
    let step = f.compile(common::client()).unwrap();
    let c = common::client();
    let dev = &c.devices()[0];
    let mut wb = c.buffer_from_host(&vec![1f32; 256], &[256], dev).unwrap();
    let xb = c.buffer_from_host(&vec![2f32; 256], &[256], dev).unwrap();
    let address = wb.device_address().unwrap();
    for k in 1..=3 {
        let mut out = step
            .execute(vec![vec![Arg::Donated(wb), Arg::Borrowed(&xb)]])
            .unwrap()
            .remove(0);
        wb = out.remove(1);
        assert_eq!(
            wb.device_address().unwrap(),
            address,
            "step {k} did not update w in place"
        );
        assert_eq!(wb.to_host::<f32>().unwrap()[0], 1.0 - k as f32);
    }
    // Passing a donated parameter as borrowed is refused before PJRT.
    let err = step
        .execute(vec![vec![Arg::Borrowed(&wb), Arg::Borrowed(&xb)]])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`w`") && err.contains("donated"), "{err}");
    // As is an argument of the wrong type.
    let bad = c.buffer_from_host(&[1f32; 3], &[3], dev).unwrap();
    let err = step
        .execute(vec![vec![Arg::Donated(bad), Arg::Borrowed(&xb)]])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`w`") && err.contains("expected f32[256]"),
        "{err}"
    );
}

#[test]
fn dead_values_are_not_emitted() {
    let g = Graph::new();
    let x = g.param("x", f32t(&[4])).unwrap();
    let _unused = x.exp().unwrap().sin().unwrap();
    let y = x.tanh().unwrap();
    let text = g.build(&[&y]).unwrap().to_mlir().unwrap();
    assert!(
        text.contains("stablehlo.tanh") && !text.contains("stablehlo.exponential"),
        "{text}"
    );
    let err = g
        .build(&[&y])
        .unwrap()
        .donate(&[0])
        .unwrap()
        .donate(&[5])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no parameter 5"), "{err}");
    let h = Graph::new();
    let a = h.param("a", f32t(&[4])).unwrap();
    let s = a.sum_all().unwrap();
    let err = h
        .build(&[&s])
        .unwrap()
        .donate(&[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no output of the same type"), "{err}");
}

#[test]
fn sort_by_key_is_stable_and_permutes_values() {
    let out = eval(
        &[(i32t(&[6]), vec![3.0, 1.0, 3.0, 0.0, 1.0, 2.0])],
        |g, p| {
            let idx = g.iota(i32t(&[6]), 0)?;
            let (k, v) = p[0].sort_by_key(&[&idx])?;
            Ok(vec![k, v[0].clone()])
        },
    );
    assert_eq!(out[0], vec![0.0, 1.0, 1.0, 2.0, 3.0, 3.0]);
    assert_eq!(
        out[1],
        vec![3.0, 1.0, 4.0, 5.0, 0.0, 2.0],
        "ties keep their order"
    );
}

#[test]
fn permute_rows_selects_rows_and_zero_padding() {
    let out = eval(&[(f32t(&[2, 2]), vec![1.0, 2.0, 3.0, 4.0])], |g, p| {
        let idx = g.constant(&[1.0, 2.0, 0.0], i32t(&[3]))?;
        let inv = g.constant(&[2.0, 0.0], i32t(&[2, 1]))?;
        Ok(vec![p[0].permute_rows(&idx, &inv)?])
    });
    assert_eq!(out[0], vec![3.0, 4.0, 0.0, 0.0, 1.0, 2.0]);
}

/// Host reference for grouped_matmul: block b (< used) of x [R, K] times
/// w[groups[b]] laid out [G, N, K] (out_in) or [G, K, N].
fn grouped_reference(
    x: &[f64],
    w: &[f64],
    (r, k, n): (usize, usize, usize),
    groups: &[usize],
    used: usize,
    out_in: bool,
) -> Vec<f64> {
    let block = r / groups.len();
    let mut y = vec![0.0; r * n];
    for row in 0..used * block {
        let g = groups[row / block];
        for j in 0..n {
            y[row * n + j] = (0..k)
                .map(|c| {
                    let wv = if out_in {
                        w[(g * n + j) * k + c]
                    } else {
                        w[(g * k + c) * n + j]
                    };
                    x[row * k + c] * wv
                })
                .sum();
        }
    }
    y
}

#[test]
fn grouped_matmul_and_outer_read_each_blocks_group() {
    use sharedmoe::graph::WeightLayout;
    // 4 blocks of 2 rows, 3 groups; block 3 is past `used` (zeros).
    let (r, k, n, g) = (8usize, 3usize, 2usize, 3usize);
    let x: Vec<f64> = (0..r * k).map(|i| (i as f64 * 0.7).sin()).collect();
    let w: Vec<f64> = (0..g * n * k).map(|i| (i as f64 * 0.3).cos()).collect();
    let groups = [2usize, 0, 2, 1];
    let used = 3;
    let gf: Vec<f64> = groups.iter().map(|&v| v as f64).collect();
    let ins = [
        (f64t(&[r as i64, k as i64]), x.clone()),
        (f64t(&[g as i64, n as i64, k as i64]), w.clone()),
        (i32t(&[4]), gf),
        (i32t(&[]), vec![used as f64]),
    ];
    let out = eval(&ins, |_, p| {
        let (x, w, gr, u) = (&p[0], &p[1], &p[2], &p[3]);
        // The same w read as [G, K, N] (a different matrix, same numbers).
        let w_in_out = w.reshape(&[g as i64, k as i64, n as i64])?;
        let y = x.grouped_matmul(w, gr, u, WeightLayout::OutIn)?;
        Ok(vec![
            y.clone(),
            x.grouped_matmul(&w_in_out, gr, u, WeightLayout::InOut)?,
            // sum over blocks of y_b^T x_b per group: [G, N, K]
            y.grouped_outer(x, gr, u, g as i64)?,
        ])
    });
    let dims = (r, k, n);
    let want_y = grouped_reference(&x, &w, dims, &groups, used, true);
    assert_close(&out[0], &want_y, 1e-14, "grouped_matmul out_in");
    let want_in_out = grouped_reference(&x, &w, dims, &groups, used, false);
    assert_close(&out[1], &want_in_out, 1e-14, "grouped_matmul in_out");
    let mut want_outer = vec![0.0; g * n * k];
    for row in 0..used * 2 {
        let e = groups[row / 2];
        for j in 0..n {
            for c in 0..k {
                want_outer[(e * n + j) * k + c] += want_y[row * n + j] * x[row * k + c];
            }
        }
    }
    assert_close(&out[2], &want_outer, 1e-13, "grouped_outer");
    assert!(
        out[0][6 * n..].iter().all(|&v| v == 0.0),
        "rows past `used` are zero"
    );
}
