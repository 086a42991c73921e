//! One test per kernel. Each checks the CPU reference against an independent computation
//! with candle's CPU ops, always; in a `cuda` build it then runs the CUDA kernel on GPU 0
//! in f32, f16 and bf16 and compares it with the reference run on the same (rounded)
//! inputs. A `cuda` build's tests need a GPU: without one they fail, they do not skip.
//!
//! Tolerances (max |cuda - cpu| relative to the largest |cpu| value): f32 1e-4,
//! f16 4e-3, bf16 3e-2 (the output is rounded to the type: bf16 keeps 8 bits).

use candle_core::{DType, Device, IndexOp, Tensor};
use flotilla_kernels::cpu::{self, AttentionDims, RotaryDims};
use flotilla_kernels::{PagedBatch, SeqRun};
use rand::{Rng, SeedableRng, rngs::StdRng};

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn max_rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
        / scale
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let d = max_rel_diff(got, want);
    assert!(d <= tol, "{what}: max relative difference {d} > {tol}");
}

#[allow(dead_code)]
fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 3e-2,
    }
}

/// The values a tensor of `dtype` would hold: what the GPU path actually sees.
#[allow(dead_code)]
fn rounded(v: &[f32], dtype: DType) -> Vec<f32> {
    Tensor::new(v, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1())
        .expect("round trip")
}

#[cfg(feature = "cuda")]
fn gpu() -> Device {
    Device::new_cuda(0).expect("a `cuda` build's kernel tests need GPU 0")
}

#[cfg(feature = "cuda")]
fn upload(v: &[f32], shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(dev))
        .expect("upload")
}

#[cfg(feature = "cuda")]
fn download(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("download")
}

#[test]
fn add_rms_norm_matches_reference() {
    // 320: one pass of a 320-thread block; 4096: a full 1024-thread block, four passes.
    for hidden in [320, 4096] {
        add_rms_norm_case(hidden);
    }
}

fn add_rms_norm_case(hidden: usize) {
    let (rows, eps) = (5, 1e-5f32);
    let mut rng = StdRng::seed_from_u64(1);
    let x = random(&mut rng, rows * hidden, 2.0);
    let r = random(&mut rng, rows * hidden, 2.0);
    let w = random(&mut rng, hidden, 1.5);

    let mut sum = x.clone();
    let mut out = vec![0.0; x.len()];
    cpu::add_rms_norm(&mut sum, Some(&r), &w, eps, &mut out).unwrap();
    // Independent: candle's add and candle-nn's rms_norm.
    let t = |v: &[f32], s: &[usize]| Tensor::from_slice(v, s, &Device::Cpu).unwrap();
    let want_sum = (t(&x, &[rows, hidden]) + t(&r, &[rows, hidden])).unwrap();
    let want = candle_nn::ops::rms_norm(&want_sum, &t(&w, &[hidden]), eps).unwrap();
    assert_close(
        &sum,
        &want_sum.flatten_all().unwrap().to_vec1().unwrap(),
        1e-6,
        "cpu sum",
    );
    assert_close(
        &out,
        &want.flatten_all().unwrap().to_vec1().unwrap(),
        1e-5,
        "cpu norm",
    );
    // Without a residual it is a plain RMSNorm and leaves x alone.
    let mut plain_x = x.clone();
    let mut plain = vec![0.0; x.len()];
    cpu::add_rms_norm(&mut plain_x, None, &w, eps, &mut plain).unwrap();
    assert_eq!(plain_x, x);
    let want_plain =
        candle_nn::ops::rms_norm(&t(&x, &[rows, hidden]), &t(&w, &[hidden]), eps).unwrap();
    assert_close(
        &plain,
        &want_plain.flatten_all().unwrap().to_vec1().unwrap(),
        1e-5,
        "cpu plain",
    );
    // Bad shapes are errors.
    assert!(cpu::add_rms_norm(&mut [0.0; 7], None, &w, eps, &mut [0.0; 7]).is_err());

    #[cfg(feature = "cuda")]
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dev = gpu();
        let (xr, rr, wr) = (rounded(&x, dtype), rounded(&r, dtype), rounded(&w, dtype));
        // The kernel rounds the sum to the storage type before normalising it.
        let mut want_sum = xr.clone();
        let mut want = vec![0.0; x.len()];
        cpu::add_rms_norm(&mut want_sum, Some(&rr), &wr, eps, &mut want).unwrap();
        let mut want_sum = rounded(&want_sum, dtype);
        cpu::add_rms_norm(&mut want_sum, None, &wr, eps, &mut want).unwrap();
        let gx = upload(&xr, &[rows, hidden], dtype, &dev);
        let gr = upload(&rr, &[rows, hidden], dtype, &dev);
        let gw = upload(&wr, &[hidden], dtype, &dev);
        let got = flotilla_kernels::cuda::add_rms_norm(&gx, Some(&gr), &gw, eps).unwrap();
        assert_close(
            &download(&gx),
            &want_sum,
            tolerance(dtype),
            &format!("cuda sum {dtype:?}"),
        );
        assert_close(
            &download(&got),
            &want,
            tolerance(dtype),
            &format!("cuda norm {dtype:?}"),
        );
        let plain = flotilla_kernels::cuda::add_rms_norm(&gr, None, &gw, eps).unwrap();
        let mut rr2 = rr.clone();
        let mut want_plain = vec![0.0; x.len()];
        cpu::add_rms_norm(&mut rr2, None, &wr, eps, &mut want_plain).unwrap();
        assert_close(
            &download(&plain),
            &want_plain,
            tolerance(dtype),
            &format!("cuda plain {dtype:?}"),
        );
    }
}

#[test]
fn rotary_matches_reference() {
    // 4 x 32 pairs fit one pass of the block; 16 x 64 pairs take four.
    for (qh, kvh, hd) in [(4, 2, 64), (16, 8, 128)] {
        rotary_case(qh, kvh, hd);
    }
}

fn rotary_case(qh: usize, kvh: usize, hd: usize) {
    let (t, max_pos) = (6, 40);
    let mut rng = StdRng::seed_from_u64(2);
    let q = random(&mut rng, t * qh * hd, 1.0);
    let k = random(&mut rng, t * kvh * hd, 1.0);
    let positions: Vec<u32> = vec![0, 1, 2, 17, 39, 5];
    let half = hd / 2;
    let angles: Vec<f32> = (0..max_pos * half)
        .map(|i| (i / half) as f32 * 10000f32.powf(-((i % half) as f32) / half as f32))
        .collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let dims = RotaryDims {
        q_heads: qh,
        kv_heads: kvh,
        head_dim: hd,
    };

    let (mut q1, mut k1) = (q.clone(), k.clone());
    cpu::rotary_inplace(&mut q1, &mut k1, &positions, &cos, &sin, dims).unwrap();
    // Independent: candle-nn's rope_thd with each token's rows of the tables.
    let pos = Tensor::new(positions.as_slice(), &Device::Cpu).unwrap();
    let table = |v: &[f32]| {
        Tensor::from_slice(v, (max_pos, half), &Device::Cpu)
            .unwrap()
            .index_select(&pos, 0)
            .unwrap()
    };
    let (c, s) = (table(&cos), table(&sin));
    for (got, src, heads) in [(&q1, &q, qh), (&k1, &k, kvh)] {
        let x = Tensor::from_slice(src, (1, t, heads, hd), &Device::Cpu).unwrap();
        let want = candle_nn::rotary_emb::rope_thd(&x, &c, &s).unwrap();
        assert_close(
            got,
            &want.flatten_all().unwrap().to_vec1().unwrap(),
            1e-5,
            "cpu rotary",
        );
    }
    // A position past the table is an error, not a read out of bounds.
    let (mut q2, mut k2) = (q.clone(), k.clone());
    let far = vec![0, 1, 2, 3, 4, max_pos as u32];
    assert!(cpu::rotary_inplace(&mut q2, &mut k2, &far, &cos, &sin, dims).is_err());

    #[cfg(feature = "cuda")]
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dev = gpu();
        let (mut wq, mut wk) = (rounded(&q, dtype), rounded(&k, dtype));
        let gq = upload(&wq, &[t, qh, hd], dtype, &dev);
        let gk = upload(&wk, &[t, kvh, hd], dtype, &dev);
        cpu::rotary_inplace(&mut wq, &mut wk, &positions, &cos, &sin, dims).unwrap();
        let gp = Tensor::new(positions.as_slice(), &dev).unwrap();
        let gc = Tensor::from_slice(&cos, (max_pos, half), &dev).unwrap();
        let gs = Tensor::from_slice(&sin, (max_pos, half), &dev).unwrap();
        flotilla_kernels::cuda::rotary_inplace(&gq, &gk, &gp, &positions, &gc, &gs).unwrap();
        assert_close(
            &download(&gq),
            &wq,
            tolerance(dtype),
            &format!("cuda rotary q {dtype:?}"),
        );
        assert_close(
            &download(&gk),
            &wk,
            tolerance(dtype),
            &format!("cuda rotary k {dtype:?}"),
        );
    }
}

/// Three sequences over scattered blocks of a 12-block cache: a 21-token prefill, a
/// decode step at position 37, and a 3-token chunk continuing at position 16.
fn scenario() -> (Vec<Vec<u32>>, Vec<(usize, usize)>) {
    let tables = vec![vec![7, 2], vec![0, 11, 4], vec![9, 5]];
    let spans = vec![(0, 21), (37, 1), (16, 3)];
    (tables, spans)
}

fn runs<'a>(tables: &'a [Vec<u32>], spans: &[(usize, usize)]) -> Vec<SeqRun<'a>> {
    tables
        .iter()
        .zip(spans)
        .map(|(b, &(pos, len))| SeqRun {
            blocks: b,
            pos,
            len,
        })
        .collect()
}

#[test]
fn write_kv_matches_reference() {
    let (bs, blocks, width) = (16, 12, 2 * 32);
    let (tables, spans) = scenario();
    let batch = PagedBatch::new(&runs(&tables, &spans), bs, blocks).unwrap();
    let t = batch.tokens();
    let mut rng = StdRng::seed_from_u64(3);
    let k = random(&mut rng, t * width, 1.0);
    let v = random(&mut rng, t * width, 1.0);
    let fill = random(&mut rng, blocks * bs * width, 1.0);
    let (mut kc, mut vc) = (fill.clone(), fill.clone());
    cpu::write_kv(&k, &v, &mut kc, &mut vc, &batch).unwrap();
    // Independent: token i of sequence s at position p lives at table[p / bs] * bs + p % bs.
    let mut row = 0;
    let mut written = vec![false; blocks * bs];
    for (table, &(pos, len)) in tables.iter().zip(&spans) {
        for p in pos..pos + len {
            let slot = table[p / bs] as usize * bs + p % bs;
            assert_eq!(kc[slot * width..][..width], k[row * width..][..width]);
            assert_eq!(vc[slot * width..][..width], v[row * width..][..width]);
            written[slot] = true;
            row += 1;
        }
    }
    for (slot, _) in written.iter().enumerate().filter(|(_, w)| !**w) {
        assert_eq!(
            kc[slot * width..][..width],
            fill[slot * width..][..width],
            "slot {slot} untouched"
        );
    }
    // A block table naming a block outside the cache is refused when the batch is built.
    let bad = vec![vec![12u32]];
    assert!(PagedBatch::new(&runs(&bad, &[(0, 1)]), bs, blocks).is_err());
    // So is a position past the sequence's blocks.
    assert!(PagedBatch::new(&runs(&tables[..1], &[(30, 3)]), bs, blocks).is_err());

    #[cfg(feature = "cuda")]
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dev = gpu();
        let db = flotilla_kernels::cuda::DeviceBatch::upload(batch.clone(), &dev).unwrap();
        let fr = rounded(&fill, dtype);
        let (kr, vr) = (rounded(&k, dtype), rounded(&v, dtype));
        let gkc = upload(&fr, &[blocks, bs, width], dtype, &dev);
        let gvc = upload(&fr, &[blocks, bs, width], dtype, &dev);
        let gk = upload(&kr, &[t, width], dtype, &dev);
        let gv = upload(&vr, &[t, width], dtype, &dev);
        flotilla_kernels::cuda::write_kv(&gk, &gv, &gkc, &gvc, &db).unwrap();
        let (mut wk, mut wv) = (fr.clone(), fr.clone());
        cpu::write_kv(&kr, &vr, &mut wk, &mut wv, &batch).unwrap();
        // A copy: exact.
        assert_eq!(download(&gkc), wk, "cuda write k {dtype:?}");
        assert_eq!(download(&gvc), wv, "cuda write v {dtype:?}");
    }
}

#[test]
fn paged_attention_matches_reference() {
    // GQA at the common head sizes, plain multi-head with a head_dim that is not a multiple
    // of 32, and the largest head_dim the kernel takes.
    for (heads, kv_heads, hd) in [(8, 2, 64), (8, 2, 128), (4, 4, 80), (2, 1, 256)] {
        paged_attention_case(heads, kv_heads, hd);
    }
}

fn paged_attention_case(heads: usize, kv_heads: usize, hd: usize) {
    let (bs, blocks) = (16, 12);
    let (tables, spans) = scenario();
    let batch = PagedBatch::new(&runs(&tables, &spans), bs, blocks).unwrap();
    let t = batch.tokens();
    let width = kv_heads * hd;
    let mut rng = StdRng::seed_from_u64(4 + hd as u64);
    let q = random(&mut rng, t * heads * hd, 1.0);
    let kc = random(&mut rng, blocks * bs * width, 1.0);
    let vc = random(&mut rng, blocks * bs * width, 1.0);
    let dims = AttentionDims::new(heads, kv_heads, hd);
    let got = cpu::paged_attention(&q, &kc, &vc, &batch, dims).unwrap();

    // Independent: gather each sequence's cache rows densely, then softmax(q k^T) v with
    // candle's matmul and softmax, one query token at a time over its causal prefix.
    let kc_t = Tensor::from_slice(&kc, (blocks * bs, kv_heads, hd), &Device::Cpu).unwrap();
    let vc_t = Tensor::from_slice(&vc, (blocks * bs, kv_heads, hd), &Device::Cpu).unwrap();
    let mut want = Vec::with_capacity(q.len());
    let mut row = 0;
    for (table, &(pos, len)) in tables.iter().zip(&spans) {
        for p in pos..pos + len {
            let slots: Vec<u32> = (0..=p)
                .map(|j| table[j / bs] * bs as u32 + (j % bs) as u32)
                .collect();
            let idx = Tensor::new(slots.as_slice(), &Device::Cpu).unwrap();
            let (k, v) = (
                kc_t.index_select(&idx, 0).unwrap(),
                vc_t.index_select(&idx, 0).unwrap(),
            );
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qh =
                    Tensor::from_slice(&q[(row * heads + h) * hd..][..hd], (1, hd), &Device::Cpu)
                        .unwrap();
                let kh = k.i((.., kvh)).unwrap().contiguous().unwrap();
                let vh = v.i((.., kvh)).unwrap().contiguous().unwrap();
                let s = (qh.matmul(&kh.t().unwrap()).unwrap() * f64::from(dims.scale)).unwrap();
                let w = candle_nn::ops::softmax_last_dim(&s).unwrap();
                want.extend(
                    w.matmul(&vh)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                );
            }
            row += 1;
        }
    }
    assert_close(
        &got,
        &want,
        1e-5,
        &format!("cpu attention {heads}/{kv_heads} heads of {hd}"),
    );
    // Heads that do not divide by the kv heads are refused.
    let odd = AttentionDims {
        num_heads: kv_heads + 1,
        ..dims
    };
    let q_odd = vec![0.0; t * (kv_heads + 1) * hd];
    if kv_heads > 1 {
        assert!(cpu::paged_attention(&q_odd, &kc, &vc, &batch, odd).is_err());
    }

    #[cfg(feature = "cuda")]
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dev = gpu();
        let db = flotilla_kernels::cuda::DeviceBatch::upload(batch.clone(), &dev).unwrap();
        let (qr, kr, vr) = (rounded(&q, dtype), rounded(&kc, dtype), rounded(&vc, dtype));
        let want = cpu::paged_attention(&qr, &kr, &vr, &batch, dims).unwrap();
        let gq = upload(&qr, &[t, heads, hd], dtype, &dev);
        let gk = upload(&kr, &[blocks, bs, kv_heads, hd], dtype, &dev);
        let gv = upload(&vr, &[blocks, bs, kv_heads, hd], dtype, &dev);
        let out = flotilla_kernels::cuda::paged_attention(&gq, &gk, &gv, &db, dims).unwrap();
        assert_close(
            &download(&out),
            &want,
            tolerance(dtype),
            &format!("cuda attention {heads}/{kv_heads} heads of {hd}, {dtype:?}"),
        );
    }
}
