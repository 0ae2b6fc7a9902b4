//! Finite-difference checks (f64, central differences) of the ops whose backward the model
//! relies on: the composite norms, softmax, log-softmax/gather, RoPE, and attention with GQA.
//! Each checks d(Σ w ⊙ f(x))/dx against autograd for a random weighting w.

use candle_core::{DType, Device, Tensor, Var};
use lmforge::model::layers::{causal_mask, softmax_last, Norm, Rope};
use lmforge::rng::Rng;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| r.normal()).collect::<Vec<f64>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

/// Compares autograd with central differences for every element of `x`.
fn check(name: &str, x: Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
    let out_shape = f(&x).dims().to_vec();
    let w = randn(&out_shape, 99);
    let objective = |t: &Tensor| (f(t) * &w).unwrap().sum_all().unwrap();
    let var = Var::from_tensor(&x).unwrap();
    let grads = objective(var.as_tensor()).backward().unwrap();
    let g: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("gradient reaches the input")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    let mut worst = 0f64;
    for i in 0..base.len() {
        let eval = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            let t = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
            objective(&t).to_scalar::<f64>().unwrap()
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        worst = worst.max((fd - g[i]).abs() / (1.0 + fd.abs()));
    }
    println!("{name}: worst relative error {worst:e}");
    assert!(
        worst < 1e-6,
        "{name}: autograd disagrees with finite differences by {worst}"
    );
}

#[test]
fn layer_norm_and_rms_norm() {
    let (w, b) = (randn(&[7], 1), randn(&[7], 2));
    let ln = Norm::LayerNorm {
        weight: w.clone(),
        bias: b,
        eps: 1e-5,
    };
    check("layer_norm", randn(&[3, 7], 3), &|x| ln.forward(x).unwrap());
    let rms = Norm::RmsNorm {
        weight: w,
        eps: 1e-6,
    };
    check("rms_norm", randn(&[3, 7], 4), &|x| rms.forward(x).unwrap());
    // And with respect to the weights.
    let x = randn(&[3, 7], 5);
    check("layer_norm weight", randn(&[7], 6), &|w| {
        Norm::LayerNorm {
            weight: w.clone(),
            bias: randn(&[7], 2),
            eps: 1e-5,
        }
        .forward(&x)
        .unwrap()
    });
}

#[test]
fn softmax_and_log_softmax_gather() {
    check("softmax", randn(&[4, 9], 7), &|x| softmax_last(x).unwrap());
    let targets = Tensor::new(&[1u32, 8, 0, 4], &Device::Cpu).unwrap();
    check("log_softmax+gather", randn(&[4, 9], 8), &|x| {
        lmforge::losses::gather_logprobs(x, &targets).unwrap()
    });
    check("cross_entropy", randn(&[4, 9], 9), &|x| {
        lmforge::losses::cross_entropy(x, &targets)
            .unwrap()
            .reshape(1)
            .unwrap()
    });
}

#[test]
fn rope() {
    let rope = Rope::new(8, 32, 10000.0, &Device::Cpu).unwrap();
    check("rope", randn(&[1, 2, 5, 8], 10), &|x| {
        rope.apply(x, 3).unwrap()
    });
}

#[test]
fn rope_scores_depend_only_on_relative_position() {
    let rope = Rope::new(8, 64, 10000.0, &Device::Cpu).unwrap();
    let (q, k) = (randn(&[1, 1, 1, 8], 11), randn(&[1, 1, 1, 8], 12));
    let score = |qp: usize, kp: usize| {
        let a = rope.apply(&q, qp).unwrap();
        let b = rope.apply(&k, kp).unwrap();
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (s1, s2) = (score(5, 2), score(40, 37));
    assert!((s1 - s2).abs() < 1e-4, "{s1} vs {s2}");
    assert!((score(5, 2) - score(5, 4)).abs() > 1e-6);
}

/// The attention core as the decoder computes it (GQA repeat, scale, mask, softmax, ·V).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Tensor {
    let (b, h, t, d) = q.dims4().unwrap();
    let kvh = k.dim(1).unwrap();
    let rep = |x: &Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kvh, h / kvh, t, d))
            .unwrap()
            .reshape((b, h, t, d))
            .unwrap()
    };
    let att = (q.matmul(&rep(k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let mask = causal_mask(t, 0, 0, window, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    softmax_last(&att.broadcast_add(&mask).unwrap())
        .unwrap()
        .matmul(&rep(v))
        .unwrap()
}

#[test]
fn attention_with_gqa_and_window() {
    let (k, v) = (randn(&[1, 2, 5, 4], 13), randn(&[1, 2, 5, 4], 14));
    check("attention dq", randn(&[1, 4, 5, 4], 15), &|q| {
        attention(q, &k, &v, None)
    });
    let q = randn(&[1, 4, 5, 4], 16);
    check("attention dk", k.clone(), &|k| {
        attention(&q, k, &v, Some(3))
    });
    check("attention dv", v.clone(), &|v| attention(&q, &k, v, None));
}
