//! Gradients of every differentiable op, and of the compositions a
//! transformer step is made of, against central finite differences in f64
//! on the real CPU plugin (relative error < 1e-6).

mod common;

use common::{check_grad, normal, rng, uniform};
use sharedmoe::graph::{concatenate, DType, DotDims, Graph, Result, Tensor, TensorType};

fn randn(seed: u64, n: usize) -> Vec<f64> {
    normal(&mut rng(seed), n)
}

fn positive(seed: u64, n: usize) -> Vec<f64> {
    uniform(&mut rng(seed), n, 0.5, 2.0)
}

/// Distinct values (no ties) for max/min/top-k, shuffled.
fn distinct(seed: u64, n: usize) -> Vec<f64> {
    let mut r = rng(seed);
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * 0.37 - 1.0).collect();
    for i in (1..n).rev() {
        let j = rand::Rng::gen_range(&mut r, 0..=i);
        v.swap(i, j);
    }
    v
}

fn unary(f: fn(&Tensor) -> Result<Tensor>, x: Vec<f64>) {
    check_grad(&[vec![2, 3]], &[x], |_, p| f(&p[0]));
}

#[test]
fn grad_unary_ops() {
    unary(|x| x.neg(), randn(1, 6));
    unary(|x| x.exp(), randn(2, 6));
    unary(|x| x.log(), positive(3, 6));
    unary(|x| x.rsqrt(), positive(4, 6));
    unary(|x| x.sqrt(), positive(5, 6));
    unary(|x| x.tanh(), randn(6, 6));
    unary(|x| x.logistic(), randn(7, 6));
    unary(|x| x.abs(), vec![-1.5, -0.3, 0.2, 0.9, 2.0, -2.2]);
    unary(|x| x.sin(), randn(8, 6));
    unary(|x| x.cos(), randn(9, 6));
    unary(|x| x.square(), randn(10, 6));
}

fn binary(f: fn(&Tensor, &Tensor) -> Result<Tensor>, a: Vec<f64>, b: Vec<f64>) {
    check_grad(&[vec![2, 3], vec![2, 3]], &[a, b], |_, p| f(&p[0], &p[1]));
}

#[test]
fn grad_binary_ops() {
    binary(|a, b| a.add(b), randn(1, 6), randn(2, 6));
    binary(|a, b| a.sub(b), randn(3, 6), randn(4, 6));
    binary(|a, b| a.mul(b), randn(5, 6), randn(6, 6));
    binary(|a, b| a.div(b), randn(7, 6), positive(8, 6));
    let (a, b) = (
        distinct(9, 6),
        distinct(10, 6).iter().map(|v| v + 0.1).collect(),
    );
    binary(|a, b| a.maximum(b), a.clone(), b);
    let b2: Vec<f64> = distinct(11, 6).iter().map(|v| v + 0.05).collect();
    binary(|a, b| a.minimum(b), a, b2);
    binary(|a, b| a.pow(b), positive(12, 6), randn(13, 6));
}

#[test]
fn grad_broadcasting_binary() {
    // [2, 1, 3] * [4, 1] -> [2, 4, 3]
    check_grad(
        &[vec![2, 1, 3], vec![4, 1]],
        &[randn(1, 6), randn(2, 4)],
        |_, p| p[0].mul(&p[1]),
    );
    check_grad(&[vec![3], vec![]], &[randn(3, 3), vec![0.7]], |_, p| {
        p[0].sub(&p[1])?.div(&p[1])
    });
}

#[test]
fn grad_select_and_convert() {
    check_grad(
        &[vec![2, 3], vec![2, 3]],
        &[randn(1, 6), randn(2, 6)],
        |_, p| {
            let pred = p[0].gt(&p[1])?;
            pred.select(&p[0].mul(&p[1])?, &p[1].exp()?)
        },
    );
    // f64 -> f64 convert is the identity; the cross-dtype rule is checked
    // in the graph unit tests by type, and here through an exact case.
    check_grad(&[vec![4]], &[randn(3, 4)], |_, p| {
        p[0].convert(DType::F64)?.mul(&p[0])
    });
}

#[test]
fn grad_shape_ops() {
    let x = randn(1, 24);
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].reshape(&[4, 6])?.exp()
    });
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].transpose(&[2, 0, 1])?.sin()
    });
    check_grad(&[vec![3, 1]], &[randn(2, 3)], |_, p| {
        p[0].broadcast_in_dim(&[2, 3, 5], &[1, 2])?.tanh()
    });
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].slice(&[0, 1, 0], &[2, 3, 4], &[1, 1, 2])?.exp()
    });
    check_grad(
        &[vec![2, 3], vec![2, 2]],
        &[randn(3, 6), randn(4, 4)],
        |_, p| concatenate(&[&p[0], &p[1], &p[0]], 1)?.cos(),
    );
    check_grad(&[vec![2, 3], vec![]], &[randn(5, 6), vec![0.3]], |_, p| {
        p[0].pad(&p[1], &[1, 0], &[0, 2], &[1, 1])?.exp()
    });
}

#[test]
fn grad_dynamic_slices() {
    check_grad(&[vec![4, 5]], &[randn(1, 20)], |g, p| {
        let (i, j) = (g.scalar(1.0, DType::I32)?, g.scalar(2.0, DType::I32)?);
        p[0].dynamic_slice(&[&i, &j], &[2, 3])?.exp()
    });
    check_grad(
        &[vec![4, 5], vec![2, 2]],
        &[randn(2, 20), randn(3, 4)],
        |g, p| {
            let (i, j) = (g.scalar(2.0, DType::I32)?, g.scalar(1.0, DType::I32)?);
            p[0].dynamic_update_slice(&p[1].exp()?, &[&i, &j])?.sin()
        },
    );
}

#[test]
fn grad_dot_general() {
    // Batch dim 0 on both sides, two contracting dims, free dims on both.
    let dims = DotDims {
        lhs_contract: vec![3, 1],
        rhs_contract: vec![0, 2],
        lhs_batch: vec![0],
        rhs_batch: vec![3],
    };
    check_grad(
        &[vec![2, 3, 4, 2], vec![2, 5, 3, 2]],
        &[randn(1, 48), randn(2, 60)],
        |_, p| p[0].dot_general(&p[1], &dims),
    );
    check_grad(
        &[vec![3, 4], vec![4, 2]],
        &[randn(3, 12), randn(4, 8)],
        |_, p| p[0].matmul(&p[1]),
    );
    check_grad(
        &[vec![2, 3, 4], vec![2, 4, 2]],
        &[randn(5, 24), randn(6, 16)],
        |_, p| p[0].matmul(&p[1]),
    );
    check_grad(
        &[vec![2, 3, 4], vec![5, 4]],
        &[randn(7, 24), randn(8, 20)],
        |_, p| p[0].linear(&p[1]),
    );
}

#[test]
fn grad_reductions() {
    let x = distinct(1, 24);
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].reduce_sum(&[0, 2])
    });
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].reduce_max(&[1])
    });
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].reduce_min(&[2, 0])
    });
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].mean(&[-1])
    });
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].logsumexp(-1)
    });
    check_grad(&[vec![2, 3, 4]], std::slice::from_ref(&x), |_, p| {
        p[0].softmax(1)
    });
    check_grad(&[vec![2, 3, 4]], &[x], |_, p| p[0].log_softmax(-1));
}

#[test]
fn grad_top_k_values() {
    check_grad(&[vec![3, 5]], &[distinct(2, 15)], |_, p| {
        let (v, _) = p[0].top_k(2)?;
        v.exp()
    });
}

#[test]
fn grad_gather_and_scatter() {
    check_grad(&[vec![5, 3]], &[randn(1, 15)], |g, p| {
        let idx = g.constant(&[4.0, 0.0, 4.0, 2.0], TensorType::new(DType::I32, &[2, 2]))?;
        p[0].take(&idx)?.sin()
    });
    check_grad(
        &[vec![4, 2], vec![3, 2]],
        &[randn(2, 8), randn(3, 6)],
        |g, p| {
            let idx = g.constant(&[1.0, 3.0, 1.0], TensorType::new(DType::I32, &[3]))?;
            p[0].scatter_add(&idx, &p[1])?.exp()
        },
    );
}

#[test]
fn grad_all_reduce_single_replica() {
    check_grad(&[vec![3]], &[randn(1, 3)], |_, p| {
        p[0].exp()?.all_reduce_sum()?.sin()
    });
}

// ---------------------------------------------------------------- compositions

/// Mean next-token cross-entropy of logits [N, V] against integer labels.
fn softmax_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let v = logits.dim(-1)?;
    let g = logits.graph();
    let classes = g.iota(TensorType::new(DType::I32, &[logits.dim(0)?, v]), 1)?;
    let onehot = classes
        .eq(&labels.reshape(&[-1, 1])?)?
        .convert(logits.dtype())?;
    let logp = logits.log_softmax(-1)?;
    logp.mul(&onehot)?.reduce_sum(&[1])?.mean_all()?.neg()
}

#[test]
fn grad_softmax_cross_entropy() {
    check_grad(&[vec![4, 6]], &[randn(1, 24)], |g, p| {
        let labels = g.constant(&[0.0, 5.0, 2.0, 2.0], TensorType::new(DType::I32, &[4]))?;
        softmax_cross_entropy(&p[0], &labels)
    });
}

fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x
        .square()?
        .mean(&[-1])?
        .reshape(&[x.dims()[..x.rank() - 1].to_vec(), vec![1]].concat())?;
    x.mul(&ms.add_scalar(eps)?.rsqrt()?)?.mul(gain)
}

#[test]
fn grad_rms_norm() {
    check_grad(
        &[vec![3, 5], vec![5]],
        &[randn(1, 15), randn(2, 5)],
        |_, p| rms_norm(&p[0], &p[1], 1e-5),
    );
}

/// Causal multi-head attention: x [T, D] with H heads of size D/H.
fn attention(x: &Tensor, wq: &Tensor, wk: &Tensor, wv: &Tensor, heads: i64) -> Result<Tensor> {
    let (t, d) = (x.dim(0)?, x.dim(1)?);
    let hd = d / heads;
    let split = |w: &Tensor| -> Result<Tensor> {
        x.linear(w)?.reshape(&[t, heads, hd])?.transpose(&[1, 0, 2])
    };
    let (q, k, v) = (split(wq)?, split(wk)?, split(wv)?);
    let scores = q
        .matmul(&k.transpose(&[0, 2, 1])?)?
        .mul_scalar(1.0 / (hd as f64).sqrt())?;
    let g = x.graph();
    let row = g.iota(TensorType::new(DType::I32, &[heads, t, t]), 1)?;
    let col = g.iota(TensorType::new(DType::I32, &[heads, t, t]), 2)?;
    let masked = col.le(&row)?.select(&scores, &scores.full_like(-1e30)?)?;
    let probs = masked.softmax(-1)?;
    probs.matmul(&v)?.transpose(&[1, 0, 2])?.reshape(&[t, d])
}

#[test]
fn grad_causal_attention() {
    let shapes = [vec![4, 6], vec![6, 6], vec![6, 6], vec![6, 6]];
    let pts: Vec<Vec<f64>> = [24, 36, 36, 36]
        .iter()
        .enumerate()
        .map(|(i, &n)| randn(i as u64 + 1, n))
        .collect();
    check_grad(&shapes, &pts, |_, p| {
        attention(&p[0], &p[1], &p[2], &p[3], 2)
    });
}

/// Top-2 routed mixture of experts: router softmax over E experts, top-2,
/// weights renormalised, each token's output the weighted sum of its two
/// experts (tanh(x W_e)); tokens are gathered per choice from an expert
/// table, as the MoE layer will.
fn top2_mixture(x: &Tensor, router: &Tensor, experts: &Tensor) -> Result<Tensor> {
    let (n, d) = (x.dim(0)?, x.dim(1)?);
    let probs = x.linear(router)?.softmax(-1)?; // [N, E]
    let (top, idx) = probs.top_k(2)?; // [N, 2]
    let weights = top.div(&top.reduce_sum(&[1])?.reshape(&[n, 1])?)?;
    let chosen = experts.take(&idx)?; // [N, 2, D, D]
    let xb = x.reshape(&[n, 1, 1, d])?.broadcast_to(&[n, 2, 1, d])?;
    let dims = DotDims {
        lhs_contract: vec![3],
        rhs_contract: vec![2],
        lhs_batch: vec![0, 1],
        rhs_batch: vec![0, 1],
    };
    let y = xb
        .dot_general(&chosen, &dims)?
        .reshape(&[n, 2, d])?
        .tanh()?; // [N, 2, D]
    y.mul(&weights.reshape(&[n, 2, 1])?)?.reduce_sum(&[1])
}

#[test]
fn grad_top2_routed_mixture() {
    let shapes = [vec![5, 3], vec![4, 3], vec![4, 3, 3]];
    let pts = vec![randn(1, 15), randn(2, 12), randn(3, 36)];
    check_grad(&shapes, &pts, |_, p| top2_mixture(&p[0], &p[1], &p[2]));
}

/// Traces sum_i f(w, data[i]) for f = sum(tanh(data[i] @ w)); with
/// `in_loop` the gradient is accumulated in a while loop whose body takes
/// the per-row gradient (w is captured from outside the loop), otherwise the
/// loss total is returned.
fn row_losses(g: &Graph, w: &Tensor, data: &Tensor, in_loop: bool) -> Result<Tensor> {
    let loss_of = |i: &Tensor| -> Result<Tensor> {
        let row = data.dynamic_slice(&[i, &i.scalar_like(0.0)?], &[1, 3])?;
        row.matmul(w)?.tanh()?.sum_all()
    };
    if !in_loop {
        let mut total = g.scalar(0.0, DType::F64)?;
        for i in 0..4 {
            total = total.add(&loss_of(&g.scalar(i as f64, DType::I32)?)?)?;
        }
        return Ok(total);
    }
    let outs = g.while_loop(
        &[&g.scalar(0.0, DType::I32)?, &w.zeros_like()?],
        |s| s[0].lt(&s[0].scalar_like(4.0)?),
        |s| {
            let gw = sharedmoe::graph::grad(&loss_of(&s[0])?, &[w])?;
            Ok(vec![s[0].add_scalar(1.0)?, s[1].add(&gw[0])?])
        },
    )?;
    Ok(outs[1].clone())
}

#[test]
fn grad_accumulated_inside_a_while_loop() {
    let (w, data) = (randn(1, 6), randn(2, 12));
    let inputs = |w: Vec<f64>| {
        vec![
            (common::f64t(&[3, 2]), w),
            (common::f64t(&[4, 3]), data.clone()),
        ]
    };
    let acc = common::eval(&inputs(w.clone()), |g, p| {
        Ok(vec![row_losses(g, &p[0], &p[1], true)?])
    })
    .remove(0);
    let h = 1e-6;
    let fd: Vec<f64> = (0..w.len())
        .map(|i| {
            let (mut plus, mut minus) = (w.clone(), w.clone());
            plus[i] += h;
            minus[i] -= h;
            let total = |w: Vec<f64>| {
                common::eval(&inputs(w), |g, p| {
                    Ok(vec![row_losses(g, &p[0], &p[1], false)?])
                })[0][0]
            };
            (total(plus) - total(minus)) / (2.0 * h)
        })
        .collect();
    common::assert_close(&acc, &fd, 1e-6, "accumulated gradient");
}

#[test]
fn grad_of_unused_input_is_zero() {
    let g = Graph::new();
    let x = g.param("x", TensorType::new(DType::F32, &[3])).unwrap();
    let y = g.param("y", TensorType::new(DType::F32, &[3])).unwrap();
    let loss = x.exp().unwrap().sum_all().unwrap();
    let grads = sharedmoe::graph::grad(&loss, &[&x, &y]).unwrap();
    let f = g.build(&[&grads[1]]).unwrap();
    let out = f.compile(common::client()).unwrap();
    let host = [
        sharedmoe::graph::HostTensor::from_f64(&[1.0], TensorType::new(DType::F32, &[3])).unwrap(),
        sharedmoe::graph::HostTensor::from_f64(&[1.0], TensorType::new(DType::F32, &[3])).unwrap(),
    ];
    assert_eq!(
        out.run(common::client(), &host).unwrap()[0].to_f64(),
        vec![0.0; 3]
    );
}

#[test]
fn grad_through_dtype_conversions_is_exact() {
    // d/dx sum(convert(x, f32) * w) = w (converted back to f64). Finite
    // differences cannot resolve f32 rounding, so check the exact value.
    let w = [0.5, -2.0, 3.25];
    let out = common::eval(&[(common::f64t(&[3]), vec![1.0, 2.0, 3.0])], |g, p| {
        let wt = g.constant(&w, TensorType::new(DType::F32, &[3]))?;
        let loss = p[0].convert(DType::F32)?.mul(&wt)?.sum_all()?;
        let bf = p[0]
            .convert(DType::BF16)?
            .convert(DType::F32)?
            .mul(&wt)?
            .sum_all()?;
        let ints = p[0].convert(DType::I32)?.convert(DType::F64)?.sum_all()?;
        Ok(vec![
            sharedmoe::graph::grad(&loss, &[&p[0]])?.remove(0),
            sharedmoe::graph::grad(&bf, &[&p[0]])?.remove(0),
            sharedmoe::graph::grad(&ints, &[&p[0]])?.remove(0),
        ])
    });
    assert_eq!(out[0], w.to_vec());
    assert_eq!(out[1], w.to_vec());
    assert_eq!(
        out[2],
        vec![0.0; 3],
        "integer conversions carry no gradient"
    );
}

#[test]
fn grad_permute_rows_with_padding_and_fan_out() {
    // x [3, 2] -> rows [5, 2]: rows 0, 2, 3 take x rows 1, 0, 1 (x row 1
    // used twice), rows 1 and 4 are padding (index 3 = zero row).
    check_grad(&[vec![3, 2]], &[randn(4, 6)], |g, p| {
        let idx = g.constant(
            &[1.0, 3.0, 0.0, 1.0, 3.0],
            TensorType::new(DType::I32, &[5]),
        )?;
        // inverse [3, 2]: x row 0 -> output row 2 (and nothing = 5);
        // row 1 -> rows 0 and 3; row 2 -> nothing.
        let inv = g.constant(
            &[2.0, 5.0, 0.0, 3.0, 5.0, 5.0],
            TensorType::new(DType::I32, &[3, 2]),
        )?;
        p[0].permute_rows(&idx, &inv)?.sin()
    });
}

#[test]
fn grad_grouped_matmul_and_outer() {
    use sharedmoe::graph::WeightLayout;
    // 3 blocks of 2 rows; groups [1, 0, 1]; only 2 blocks used, so block 2
    // has zero gradient.
    let blocks = |g: &Graph| -> Result<(Tensor, Tensor)> {
        Ok((
            g.constant(&[1.0, 0.0, 1.0], TensorType::new(DType::I32, &[3]))?,
            g.constant(&[2.0], TensorType::new(DType::I32, &[]))?,
        ))
    };
    for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
        let w_dims = match layout {
            WeightLayout::OutIn => vec![2, 4, 3],
            WeightLayout::InOut => vec![2, 3, 4],
        };
        check_grad(
            &[vec![6, 3], w_dims],
            &[randn(11, 18), randn(12, 24)],
            |g, p| {
                let (groups, used) = blocks(g)?;
                p[0].grouped_matmul(&p[1], &groups, &used, layout)?.sin()
            },
        );
    }
    check_grad(
        &[vec![6, 3], vec![6, 4]],
        &[randn(13, 18), randn(14, 24)],
        |g, p| {
            let (groups, used) = blocks(g)?;
            p[0].grouped_outer(&p[1], &groups, &used, 2)?.sin()
        },
    );
}
