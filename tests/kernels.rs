//! Fused kernels against their composite references: forward values and every input gradient
//! on random shapes (odd sizes, grouped-query heads, prefix slots, a KV-cache offset, sliding
//! windows, tiles that end mid-way), plus central finite differences of the fused backward.
//! The composites are themselves finite-difference checked in f64 by `tests/gradcheck.rs`.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use lmforge::kernels::act::{self, Act};
use lmforge::kernels::{adamw, attention};
use lmforge::model::config::Activation;
use lmforge::model::layers::{activate_composite, causal_mask, softmax_last};
use lmforge::rng::Rng;

fn randn(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.normal() as f32 * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

use common::max_abs_diff as max_diff;

/// The decoder's composite attention: (B, H, T, D) with explicit scores, mask and softmax.
/// Takes the fused op's layouts, q (B, T, H, D) and k, v (B, S, H_kv, D).
fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, spec: attention::Spec) -> Tensor {
    let (b, t, h, d) = q.dims4().unwrap();
    let (_, s, hkv, _) = k.dims4().unwrap();
    let rep = |x: &Tensor| {
        let x = x.transpose(1, 2).unwrap(); // (B, Hkv, S, D)
        x.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, hkv, h / hkv, s, d))
            .unwrap()
            .reshape((b, h, s, d))
            .unwrap()
    };
    let q = q.transpose(1, 2).unwrap().contiguous().unwrap();
    let kt = rep(k).t().unwrap().contiguous().unwrap();
    let att = (q.matmul(&kt).unwrap() * spec.scale as f64).unwrap();
    let mask = causal_mask(t, spec.past, spec.prefix, spec.window, &Device::Cpu).unwrap();
    softmax_last(&att.broadcast_add(&mask).unwrap())
        .unwrap()
        .matmul(&rep(v).contiguous().unwrap())
        .unwrap()
        .transpose(1, 2)
        .unwrap()
}

struct Case {
    b: usize,
    t: usize,
    h: usize,
    hkv: usize,
    d: usize,
    prefix: usize,
    past: usize,
    window: Option<usize>,
}

/// Forward and all three input gradients, fused vs composite, for a weighted-sum objective.
fn compare_attention(c: &Case, seed: u64) {
    let s = c.prefix + c.past + c.t;
    let spec = attention::Spec {
        scale: 1.0 / (c.d as f32).sqrt(),
        prefix: c.prefix,
        past: c.past,
        window: c.window,
    };
    let q = Var::from_tensor(&randn(&[c.b, c.t, c.h, c.d], seed, 1.0)).unwrap();
    let k = Var::from_tensor(&randn(&[c.b, s, c.hkv, c.d], seed + 1, 1.0)).unwrap();
    let v = Var::from_tensor(&randn(&[c.b, s, c.hkv, c.d], seed + 2, 1.0)).unwrap();
    let w = randn(&[c.b, c.t, c.h, c.d], seed + 3, 1.0);
    let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
        let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor());
        let g = (&o * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |x: &Var| g.get(x.as_tensor()).expect("gradient").clone();
        (o, grad(&q), grad(&k), grad(&v))
    };
    let fused = run(&|q, k, v| attention::attention(q, k, v, spec).unwrap());
    let comp = run(&|q, k, v| attention_composite(q, k, v, spec));
    let what = format!(
        "B{} T{} H{}/{} D{} prefix{} past{} window{:?}",
        c.b, c.t, c.h, c.hkv, c.d, c.prefix, c.past, c.window
    );
    for (name, a, b) in [
        ("out", &fused.0, &comp.0),
        ("dq", &fused.1, &comp.1),
        ("dk", &fused.2, &comp.2),
        ("dv", &fused.3, &comp.3),
    ] {
        let e = max_diff(a, b);
        assert!(e < 2e-5, "{what}: {name} differs by {e}");
    }
}

#[test]
fn fused_attention_matches_composite() {
    let cases = [
        // a single tile, plain multi-head
        Case {
            b: 1,
            t: 5,
            h: 2,
            hkv: 2,
            d: 4,
            prefix: 0,
            past: 0,
            window: None,
        },
        // odd sizes, GQA, more than one query tile (64) with a ragged last tile
        Case {
            b: 2,
            t: 131,
            h: 6,
            hkv: 2,
            d: 7,
            prefix: 0,
            past: 0,
            window: None,
        },
        // prefix slots and a sliding window shorter than the sequence
        Case {
            b: 1,
            t: 70,
            h: 4,
            hkv: 1,
            d: 8,
            prefix: 3,
            past: 0,
            window: Some(9),
        },
        // a KV-cache offset (decoding continues after `past` positions), GQA
        Case {
            b: 2,
            t: 3,
            h: 4,
            hkv: 2,
            d: 5,
            prefix: 0,
            past: 11,
            window: None,
        },
        // everything at once
        Case {
            b: 1,
            t: 67,
            h: 3,
            hkv: 3,
            d: 16,
            prefix: 2,
            past: 5,
            window: Some(20),
        },
        // one query (the decode step)
        Case {
            b: 3,
            t: 1,
            h: 2,
            hkv: 1,
            d: 6,
            prefix: 1,
            past: 9,
            window: None,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        compare_attention(c, 100 + 10 * i as u64);
    }
}

#[test]
fn fused_qkv_attention_matches_split_projection() {
    // GPT-2's c_attn: one (B, T, 3, H, D) projection. The qkv op reads the three parts in
    // place and writes its gradient in that layout; the reference splits the projection with
    // narrow (strided views) into the separate op, whose backward candle routes back.
    let (b, t, h, d) = (2, 70, 3, 5);
    for (window, packed) in [(None, false), (Some(6), false), (None, true)] {
        let qkv = Var::from_tensor(&randn(&[b, t, 3, h, d], 7, 1.0)).unwrap();
        let w = randn(&[b, t, h, d], 8, 1.0);
        let spec = attention::Spec {
            scale: 0.4,
            prefix: 0,
            past: 0,
            window,
        };
        // two packed examples per row, the second starting at 23 (row 0) and 41 (row 1)
        let starts = packed.then(|| attention::Segs {
            lo: std::sync::Arc::new(
                (0..b * t)
                    .map(|i| {
                        let (row, pos) = (i / t, i % t);
                        let cut = [23, 41][row];
                        if pos < cut {
                            0
                        } else {
                            cut as u32
                        }
                    })
                    .collect::<Vec<u32>>(),
            ),
            shared: None,
        });
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let o = f(qkv.as_tensor());
            let g = (&o * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (o, g.get(qkv.as_tensor()).expect("gradient").clone())
        };
        let fused = run(&|x| attention::attention_qkv(x, spec, starts.clone()).unwrap());
        let split = run(&|x| {
            let part = |i: usize| x.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
            assert!(!part(0).is_contiguous());
            attention::attention_packed(&part(0), &part(1), &part(2), spec, starts.clone()).unwrap()
        });
        let what = format!("window {window:?} packed {packed}");
        assert!(fused.1.is_contiguous() && fused.1.dims() == [b, t, 3, h, d]);
        assert!(max_diff(&fused.0, &split.0) < 1e-6, "{what}: out");
        assert!(max_diff(&fused.1, &split.1) < 1e-5, "{what}: dqkv");
    }
}

/// Central differences in f32 of Σ w ⊙ f(x) for a sample of elements of x.
fn finite_difference(name: &str, x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, samples: usize) {
    let w = randn(f(x).dims(), 77, 1.0);
    let objective = |t: &Tensor| {
        (f(t) * &w)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let var = Var::from_tensor(x).unwrap();
    let g = (f(var.as_tensor()) * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f32> = g
        .get(var.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-2f32;
    let step = (base.len() / samples).max(1);
    let mut worst = 0f64;
    for i in (0..base.len()).step_by(step) {
        let eval = |dlt: f32| {
            let mut v = base.clone();
            v[i] += dlt;
            objective(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap())
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
        worst = worst.max((fd - g[i] as f64).abs() / (1.0 + fd.abs()));
    }
    println!("{name}: worst relative error {worst:e}");
    assert!(
        worst < 5e-3,
        "{name}: fused backward disagrees with finite differences by {worst}"
    );
}

#[test]
fn fused_attention_backward_matches_finite_differences() {
    let spec = attention::Spec {
        scale: 0.4,
        prefix: 2,
        past: 1,
        window: Some(6),
    };
    let (b, t, h, hkv, d) = (1, 9, 4, 2, 3);
    let s = spec.prefix + spec.past + t;
    let q = randn(&[b, t, h, d], 1, 1.0);
    let k = randn(&[b, s, hkv, d], 2, 1.0);
    let v = randn(&[b, s, hkv, d], 3, 1.0);
    finite_difference(
        "attention dq",
        &q,
        &|q| attention::attention(q, &k, &v, spec).unwrap(),
        60,
    );
    finite_difference(
        "attention dk",
        &k,
        &|k| attention::attention(&q, k, &v, spec).unwrap(),
        60,
    );
    finite_difference(
        "attention dv",
        &v,
        &|v| attention::attention(&q, &k, v, spec).unwrap(),
        60,
    );
}

#[test]
fn fused_activations_match_composite_and_finite_differences() {
    for (a, act) in [
        (Act::GeluTanh, Activation::GeluTanh),
        (Act::Silu, Activation::Silu),
    ] {
        // 70k elements: more than one rayon chunk, with a ragged end.
        let x = Var::from_tensor(&randn(&[7, 10_001], 5, 3.0)).unwrap();
        let w = randn(&[7, 10_001], 6, 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let y = f(x.as_tensor());
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let fused = run(&|x| act::apply(x, a).unwrap());
        let comp = run(&|x| activate_composite(x, act).unwrap());
        let (ey, eg) = (max_diff(&fused.0, &comp.0), max_diff(&fused.1, &comp.1));
        assert!(ey < 1e-5 && eg < 1e-5, "{a:?}: forward {ey}, gradient {eg}");
        let small = randn(&[3, 11], 8, 2.0);
        finite_difference(
            &format!("{a:?}"),
            &small,
            &|x| act::apply(x, a).unwrap(),
            33,
        );
    }
}

#[test]
fn fused_gated_activation_matches_composite_and_finite_differences() {
    for (a, act) in [
        (Act::GeluTanh, Activation::GeluTanh),
        (Act::Silu, Activation::Silu),
    ] {
        let x = Var::from_tensor(&randn(&[7, 10_001], 15, 3.0)).unwrap();
        let u = Var::from_tensor(&randn(&[7, 10_001], 16, 1.0)).unwrap();
        let w = randn(&[7, 10_001], 17, 1.0);
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let y = f(x.as_tensor(), u.as_tensor());
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            (y, get(&x), get(&u))
        };
        let fused = run(&|x, u| act::gated(x, u, a).unwrap());
        let comp = run(&|x, u| (activate_composite(x, act).unwrap() * u).unwrap());
        for (name, f, c) in [
            ("y", &fused.0, &comp.0),
            ("dx", &fused.1, &comp.1),
            ("du", &fused.2, &comp.2),
        ] {
            let e = max_diff(f, c);
            assert!(e < 2e-5, "gated {a:?}: {name} differs by {e}");
        }
        let (xs, us) = (randn(&[3, 11], 18, 2.0), randn(&[3, 11], 19, 1.0));
        finite_difference(
            &format!("gated {a:?} dx"),
            &xs,
            &|x| act::gated(x, &us, a).unwrap(),
            33,
        );
        finite_difference(
            &format!("gated {a:?} du"),
            &us,
            &|u| act::gated(&xs, u, a).unwrap(),
            33,
        );
    }
}

#[test]
fn fused_adamw_matches_the_formula() {
    let n = 40_003;
    let (b1, b2, eps, lr, wd) = (0.9, 0.95, 1e-8, 3e-3, 0.1);
    let theta0 = randn(&[n], 1, 1.0);
    let theta = theta0.copy().unwrap();
    let (m, v) = (theta.zeros_like().unwrap(), theta.zeros_like().unwrap());
    let (mut rm, mut rv, mut rt) = (
        theta.zeros_like().unwrap().to_dtype(DType::F64).unwrap(),
        theta.zeros_like().unwrap().to_dtype(DType::F64).unwrap(),
        theta0.to_dtype(DType::F64).unwrap(),
    );
    for t in 1..=3 {
        let g = randn(&[n], 10 + t, 0.5);
        let (bc1, bc2) = (1.0 - f64::powi(b1, t as i32), 1.0 - f64::powi(b2, t as i32));
        adamw::step(
            &theta,
            &g,
            &m,
            &v,
            (b1, b2, eps),
            lr,
            1.0 - lr * wd,
            (bc1, bc2),
        )
        .unwrap();
        let g = g.to_dtype(DType::F64).unwrap();
        rm = ((&rm * b1).unwrap() + (&g * (1.0 - b1)).unwrap()).unwrap();
        rv = ((&rv * b2).unwrap() + (g.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
        let upd =
            ((&rm / bc1).unwrap() / ((&rv / bc2).unwrap().sqrt().unwrap() + eps).unwrap()).unwrap();
        rt = ((&rt * (1.0 - lr * wd)).unwrap() - (upd * lr).unwrap()).unwrap();
    }
    let f32of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    assert!(max_diff(&m, &f32of(&rm)) < 1e-6);
    assert!(max_diff(&v, &f32of(&rv)) < 1e-6);
    let e = max_diff(&theta, &f32of(&rt));
    assert!(e < 1e-6, "parameters differ from the f64 formula by {e}");
    // the step moved every parameter
    assert!(max_diff(&theta, &theta0) > 1e-3);
}

#[test]
fn fused_linear_matches_matmul_with_gradients() {
    use lmforge::kernels::linear::{linear_bias, WeightLayout};
    // m ≤ 16 takes the GEMV, larger m the blocked GEMM; odd sizes leave partial 6×16 tiles and
    // k > 256 spans two packed panels; 3001 rows give the bias gradient several row blocks.
    let shapes = [
        (1, 576, 1536),
        (3, 37, 301),
        (16, 129, 100),
        (2, 7, 5),
        (17, 300, 33),
        (200, 513, 70),
        (3001, 9, 13),
    ];
    for (m, k, n) in shapes {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            for with_bias in [false, true] {
                let wshape = match layout {
                    WeightLayout::OutIn => [n, k],
                    WeightLayout::InOut => [k, n],
                };
                let x = Var::from_tensor(&randn(&[m, k], 1, 1.0)).unwrap();
                let w = Var::from_tensor(&randn(&wshape, 2, 1.0)).unwrap();
                let b = Var::from_tensor(&randn(&[n], 4, 1.0)).unwrap();
                let dy = randn(&[m, n], 3, 1.0);
                let bias = with_bias.then_some(b.as_tensor());
                let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                    let y = f(x.as_tensor(), w.as_tensor());
                    let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                    let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                    let db = with_bias.then(|| get(&b));
                    (y, get(&x), get(&w), db)
                };
                let fused = run(&|x, w| linear_bias(x, w, bias, layout).unwrap());
                let comp = run(&|x, w| {
                    let y = match layout {
                        WeightLayout::OutIn => x.matmul(&w.t().unwrap()).unwrap(),
                        WeightLayout::InOut => x.matmul(w).unwrap(),
                    };
                    match bias {
                        Some(b) => y.broadcast_add(b).unwrap(),
                        None => y,
                    }
                });
                let tol = 2e-6 * (k.max(m) as f32);
                let what = format!("linear {layout:?} m{m} k{k} n{n} bias {with_bias}");
                for (name, a, b) in [
                    ("y", &fused.0, &comp.0),
                    ("dx", &fused.1, &comp.1),
                    ("dw", &fused.2, &comp.2),
                ] {
                    let e = max_diff(a, b);
                    assert!(e < tol, "{what}: {name} differs by {e}");
                }
                if let (Some(a), Some(b)) = (&fused.3, &comp.3) {
                    let e = max_diff(a, b);
                    assert!(e < tol, "{what}: db differs by {e}");
                }
            }
        }
    }
}

#[test]
fn frozen_linear_parts_get_no_gradient() {
    use lmforge::kernels::linear::{linear_bias, WeightLayout};
    let x = Var::from_tensor(&randn(&[40, 24], 1, 1.0)).unwrap();
    let (wv, bv) = (
        Var::from_tensor(&randn(&[12, 24], 2, 1.0)).unwrap(),
        Var::from_tensor(&randn(&[12], 3, 1.0)).unwrap(),
    );
    let (wc, bc) = (wv.as_tensor().detach(), bv.as_tensor().detach()); // constants: frozen
    let ones = Tensor::ones((40, 12), DType::F32, &Device::Cpu).unwrap();
    for (w, b) in [(&wc, &bc), (&wc, bv.as_tensor()), (wv.as_tensor(), &bc)] {
        let g = linear_bias(x.as_tensor(), w, Some(b), WeightLayout::OutIn)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(g.get(w).is_some(), w.is_variable());
        assert_eq!(g.get(b).is_some(), b.is_variable());
        let dx = g.get(x.as_tensor()).unwrap();
        assert!(max_diff(dx, &ones.matmul(&wc).unwrap()) < 1e-5);
        if let Some(db) = g.get(b) {
            assert!(max_diff(db, &Tensor::full(40f32, 12, &Device::Cpu).unwrap()) < 1e-4);
        }
        if let Some(dw) = g.get(w) {
            let want = ones.t().unwrap().matmul(x.as_tensor()).unwrap();
            assert!(max_diff(dw, &want) < 1e-4);
        }
    }
}

#[test]
fn fused_norms_match_composite_and_finite_differences() {
    use lmforge::kernels::norm;
    use lmforge::model::layers::Norm;
    // 37 columns (odd), 1001 rows: several rayon row blocks with a ragged last one.
    let (rows, c) = (1001, 37);
    let w = Var::from_tensor(&randn(&[c], 1, 1.0)).unwrap();
    let b = Var::from_tensor(&randn(&[c], 2, 1.0)).unwrap();
    let x = Var::from_tensor(&(randn(&[rows, c], 3, 2.0) + 0.5).unwrap()).unwrap();
    let dy = randn(&[rows, c], 4, 1.0);
    let ln = Norm::LayerNorm {
        weight: w.as_tensor().clone(),
        bias: b.as_tensor().clone(),
        eps: 1e-5,
    };
    let rms = Norm::RmsNorm {
        weight: w.as_tensor().clone(),
        eps: 1e-6,
    };
    for (name, norm) in [("layer norm", &ln), ("rms norm", &rms)] {
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let y = f(x.as_tensor());
            let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).cloned();
            (y, get(&x).unwrap(), get(&w).unwrap(), get(&b))
        };
        let fused = run(&|x| norm.forward(x).unwrap());
        let comp = run(&|x| norm.forward_composite(x).unwrap());
        for (what, a, e) in [
            ("y", &fused.0, &comp.0),
            ("dx", &fused.1, &comp.1),
            ("dw", &fused.2, &comp.2),
        ] {
            let d = max_diff(a, e);
            // dw sums 1001 rows
            let tol = if what == "dw" { 1e-3 } else { 2e-5 };
            assert!(d < tol, "{name}: {what} differs by {d}");
        }
        match (&fused.3, &comp.3) {
            (Some(a), Some(e)) => assert!(max_diff(a, e) < 1e-3, "{name}: db differs"),
            (None, None) => {}
            _ => panic!("{name}: bias gradient present on one side only"),
        }
    }
    let small = (randn(&[4, 9], 5, 1.5) + 0.3).unwrap();
    let (wt, bt) = (randn(&[9], 6, 1.0), randn(&[9], 7, 1.0));
    finite_difference(
        "layer norm",
        &small,
        &|x| norm::layer_norm(x, &wt, &bt, 1e-5).unwrap(),
        36,
    );
    finite_difference(
        "rms norm",
        &small,
        &|x| norm::rms_norm(x, &wt, 1e-6).unwrap(),
        36,
    );
    // weight and bias gradients by finite differences too
    let xs = small.clone();
    finite_difference(
        "layer norm dw",
        &wt,
        &|w| norm::layer_norm(&xs, w, &bt, 1e-5).unwrap(),
        9,
    );
    finite_difference(
        "layer norm db",
        &bt,
        &|b| norm::layer_norm(&xs, &wt, b, 1e-5).unwrap(),
        9,
    );
    finite_difference(
        "rms norm dw",
        &wt,
        &|w| norm::rms_norm(&xs, w, 1e-6).unwrap(),
        9,
    );
}

#[test]
fn fused_cross_entropy_matches_composite_and_finite_differences() {
    use lmforge::kernels::xent;
    use lmforge::losses::gather_logprobs_composite;
    // 37 rows × 1031 classes: several rayon tasks, a ragged last one, rows not a multiple of 8.
    for (n, v, scale) in [(37, 1031, 4.0), (5, 3, 1.0), (300, 65, 10.0)] {
        let x = Var::from_tensor(&randn(&[n, v], 11 + v as u64, scale)).unwrap();
        let mut r = Rng::new(v as u64);
        let ids: Vec<u32> = (0..n).map(|_| r.below(v as u64) as u32).collect();
        let t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let w = randn(&[n], 12, 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let lp = f(x.as_tensor());
            let g = (&lp * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (lp, g.get(x.as_tensor()).expect("gradient").clone())
        };
        let fused = run(&|x| xent::target_logprobs(x, &t).unwrap());
        let comp = run(&|x| gather_logprobs_composite(x, &t).unwrap());
        let (ey, eg) = (max_diff(&fused.0, &comp.0), max_diff(&fused.1, &comp.1));
        assert!(
            ey < 1e-4 && eg < 1e-5,
            "{n}x{v}: forward {ey}, gradient {eg}"
        );
    }
    // (B, T, V) logits with (B, T) targets keep their shape.
    let x = randn(&[2, 3, 7], 13, 1.0);
    let t = Tensor::new(&[[1u32, 0, 6], [2, 2, 5]], &Device::Cpu).unwrap();
    assert_eq!(xent::target_logprobs(&x, &t).unwrap().dims(), &[2, 3]);
    let bad = Tensor::new(&[[1u32, 0, 7], [2, 2, 5]], &Device::Cpu).unwrap();
    let err = xent::target_logprobs(&x, &bad).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let small = randn(&[4, 9], 14, 2.0);
    let t = Tensor::new(&[8u32, 0, 3, 3], &Device::Cpu).unwrap();
    finite_difference(
        "cross-entropy",
        &small,
        &|x| xent::target_logprobs(x, &t).unwrap(),
        36,
    );
}

#[test]
fn fused_dropout_regenerates_its_mask_in_the_backward() {
    use lmforge::kernels::dropout::dropout;
    let x = Var::from_tensor(&(randn(&[70_001], 21, 1.0).abs().unwrap() + 0.1).unwrap()).unwrap();
    let y = dropout(x.as_tensor(), 0.25, 99).unwrap();
    let (xv, yv): (Vec<f32>, Vec<f32>) = (x.as_tensor().to_vec1().unwrap(), y.to_vec1().unwrap());
    let zeros = yv.iter().filter(|&&v| v == 0.0).count() as f64 / yv.len() as f64;
    assert!((zeros - 0.25).abs() < 0.01, "dropped fraction {zeros}");
    assert!(xv
        .iter()
        .zip(&yv)
        .all(|(a, b)| *b == 0.0 || (b - a / 0.75).abs() < 1e-6));
    // The gradient of Σ w⊙y is w ⊙ mask / (1 − p): zero exactly where y is.
    let w = randn(&[70_001], 22, 1.0);
    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gv: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    let wv: Vec<f32> = w.to_vec1().unwrap();
    for i in 0..yv.len() {
        let want = if yv[i] == 0.0 { 0.0 } else { wv[i] / 0.75 };
        assert!((gv[i] - want).abs() < 1e-6, "element {i}");
    }
    assert_eq!(
        max_diff(&dropout(x.as_tensor(), 0.25, 99).unwrap(), &y),
        0.0
    );
    assert!(max_diff(&dropout(x.as_tensor(), 0.25, 98).unwrap(), &y) > 0.0);
}

#[test]
fn fused_rope_matches_composite_and_finite_differences() {
    use lmforge::kernels::rope::rope;
    use lmforge::model::layers::Rope;
    // tables shared by the batch (one sequence's positions) and per row (packed positions);
    // tables with distinct halves, so a swapped half would show.
    let (b, t, h, d) = (3, 11, 2, 6);
    for rows in [1, b] {
        let cos = randn(&[rows, t, 1, d], 5, 1.0);
        let sin = randn(&[rows, t, 1, d], 6, 1.0);
        let x = Var::from_tensor(&randn(&[b, t, h, d], 7, 1.0)).unwrap();
        let w = randn(&[b, t, h, d], 8, 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let y = f(x.as_tensor());
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let fused = run(&|x| rope(x, &cos, &sin).unwrap());
        let comp = run(&|x| Rope::rotate_composite(x, &cos, &sin).unwrap());
        assert!(max_diff(&fused.0, &comp.0) < 1e-6, "rows {rows}: y");
        assert!(max_diff(&fused.1, &comp.1) < 1e-6, "rows {rows}: dx");
        finite_difference(
            "rope dx",
            x.as_tensor(),
            &|x| rope(x, &cos, &sin).unwrap(),
            12,
        );
    }
}

/// x·Wᵀ (or x·W), dx and dW of the fused linear against plain f64 loops, on rayon pools of 2
/// and 3 threads and products large enough to be split between them: the GEMM's threads claim
/// grains of work from a shared counter (the vendored `gemm-common` patch), so every tile must
/// still be computed exactly once whatever thread takes it.
#[test]
fn threaded_gemm_matches_naive_products() {
    use lmforge::kernels::linear::{linear, WeightLayout};
    let naive = |a: &[Vec<f32>], b: &[Vec<f32>], bt: bool| -> Vec<Vec<f64>> {
        // a (m, k) · b (k, n), or · bᵀ for b (n, k)
        let (m, k) = (a.len(), a[0].len());
        let n = if bt { b.len() } else { b[0].len() };
        (0..m)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        (0..k)
                            .map(|l| {
                                let bv = if bt { b[j][l] } else { b[l][j] };
                                a[i][l] as f64 * bv as f64
                            })
                            .sum()
                    })
                    .collect()
            })
            .collect()
    };
    let t = |v: &[Vec<f32>]| -> Vec<Vec<f32>> {
        (0..v[0].len())
            .map(|j| v.iter().map(|r| r[j]).collect())
            .collect()
    };
    let worst = |got: &Tensor, want: &[Vec<f64>]| -> f64 {
        let got = got.to_vec2::<f32>().unwrap();
        assert_eq!((got.len(), got[0].len()), (want.len(), want[0].len()));
        got.iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
    };
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for (m, k, n) in [(517, 300, 263), (96, 1030, 389)] {
                for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
                    let wshape = match layout {
                        WeightLayout::OutIn => [n, k],
                        WeightLayout::InOut => [k, n],
                    };
                    let x = Var::from_tensor(&randn(&[m, k], 11, 1.0)).unwrap();
                    let w = Var::from_tensor(&randn(&wshape, 12, 1.0)).unwrap();
                    let dy = randn(&[m, n], 13, 1.0);
                    let y = linear(x.as_tensor(), w.as_tensor(), layout).unwrap();
                    let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
                    let (xs, ws, dys) = (
                        x.as_tensor().to_vec2::<f32>().unwrap(),
                        w.as_tensor().to_vec2::<f32>().unwrap(),
                        dy.to_vec2::<f32>().unwrap(),
                    );
                    let out_in = layout == WeightLayout::OutIn;
                    let want_y = naive(&xs, &ws, out_in);
                    let want_dx = naive(&dys, &ws, !out_in);
                    let want_dw = if out_in {
                        naive(&t(&dys), &xs, false) // (n, k) = dyᵀ·x
                    } else {
                        naive(&t(&xs), &dys, false) // (k, n) = xᵀ·dy
                    };
                    let tol = 1e-5 * (k.max(m) as f64);
                    let what = format!("{threads} threads, {layout:?} m{m} k{k} n{n}");
                    let e = worst(&y, &want_y);
                    assert!(e < tol, "{what}: y differs by {e}");
                    let e = worst(g.get(x.as_tensor()).unwrap(), &want_dx);
                    assert!(e < tol, "{what}: dx differs by {e}");
                    let e = worst(g.get(w.as_tensor()).unwrap(), &want_dw);
                    assert!(e < tol, "{what}: dw differs by {e}");
                }
            }
        });
    }
}

/// candle's element-wise ops run on rayon's pool in the vendored crate (its `execute_chunked`):
/// a large add, and the gradient a tensor used twice accumulates, against plain loops, on pools
/// of 2 and 3 threads.
#[test]
fn candle_elementwise_ops_on_rayon_match_loops() {
    // 70 001 elements: above candle's threshold for parallel element-wise work, ragged chunks.
    let shape = [7, 73, 137];
    let (a, b, dy) = (
        randn(&shape, 21, 1.0),
        randn(&shape, 22, 1.0),
        randn(&shape, 23, 1.0),
    );
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (av, bv, gv) = (flat(&a), flat(&b), flat(&dy));
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (a, b) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
            // y = (a + b)·a: a's gradient has two contributions, dy·a and dy·(a + b).
            let s = (a.as_tensor() + b.as_tensor()).unwrap();
            let y = (&s * a.as_tensor()).unwrap();
            let g = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let sum = flat(&s);
            let da = flat(g.get(a.as_tensor()).unwrap());
            for i in 0..av.len() {
                assert_eq!(sum[i], av[i] + bv[i], "{threads} threads: a + b at {i}");
                let want = gv[i] * av[i] + gv[i] * (av[i] + bv[i]);
                let e = (da[i] - want).abs();
                assert!(
                    e <= 1e-5 * want.abs().max(1.0),
                    "{threads} threads: da at {i} off by {e}"
                );
            }
        });
    }
}
