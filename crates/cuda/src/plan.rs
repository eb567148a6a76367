//! The host side of a grouped expert pass, free of CUDA so that it is tested everywhere: how a batch's routing is
//! split over devices into expert-ordered rows and a per-token combine list, and how a Linear layer maps onto a
//! column-major BLAS GEMM. `CudaExperts` launches exactly what these describe.

use moe_model::Routing;

use crate::{CudaError, Result};

/// One device's share of a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowPlan {
    /// (expert, first row, rows), experts ascending: expert `e`'s tokens are gathered rows `first..first + rows`.
    pub experts: Vec<(usize, usize, usize)>,
    /// The token of each gathered row.
    pub gather: Vec<u32>,
    /// Per token, CSR over `slots` / `weights`: its rows on this device, in expert order, and their routing weights.
    pub offsets: Vec<u32>,
    pub slots: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Splits `routing` over `devices` devices, expert `e` being on `device_of(e)` (`None`: not held, an error).
pub fn split(
    routing: &Routing,
    num_experts: usize,
    devices: usize,
    device_of: impl Fn(usize) -> Option<usize>,
) -> Result<Vec<RowPlan>> {
    let ntok = routing.num_tokens();
    let mut groups: Vec<Vec<(u32, f32)>> = vec![Vec::new(); num_experts];
    for t in 0..ntok {
        for (e, w) in routing.token(t) {
            let group = groups.get_mut(e as usize).ok_or_else(|| {
                CudaError::InvalidInput(format!("expert {e} out of range (the model has {num_experts})"))
            })?;
            group.push((t as u32, w));
        }
    }
    let mut plans = vec![RowPlan::default(); devices];
    let mut per_token: Vec<Vec<u32>> = vec![vec![0; ntok]; devices];
    for (e, group) in groups.iter().enumerate().filter(|(_, g)| !g.is_empty()) {
        let d = device_of(e)
            .filter(|&d| d < devices)
            .ok_or_else(|| CudaError::InvalidInput(format!("expert {e} is not loaded here")))?;
        let plan = &mut plans[d];
        plan.experts.push((e, plan.gather.len(), group.len()));
        for &(t, _) in group {
            plan.gather.push(t);
            per_token[d][t as usize] += 1;
        }
    }
    for (plan, counts) in plans.iter_mut().zip(&per_token) {
        plan.offsets = std::iter::once(0)
            .chain(counts.iter().scan(0u32, |acc, &c| {
                *acc += c;
                Some(*acc)
            }))
            .collect();
        let mut cursor: Vec<u32> = plan.offsets[..ntok].to_vec();
        plan.slots = vec![0; plan.gather.len()];
        plan.weights = vec![0.0; plan.gather.len()];
        for &(e, first, _) in &plan.experts {
            for (r, &(t, w)) in groups[e].iter().enumerate() {
                let c = &mut cursor[t as usize];
                plan.slots[*c as usize] = (first + r) as u32;
                plan.weights[*c as usize] = w;
                *c += 1;
            }
        }
    }
    Ok(plans)
}

/// The arguments of a column-major BLAS GEMM `C = op(A) · op(B)` (cuBLAS's convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// `Y = X · Wᵀ` for a row-major weight `W` `[out, in]` (a torch Linear) and `rows` row-major inputs `X` `[rows, in]`,
/// into row-major `Y` `[rows, out]`. Row-major matrices are the transposes of column-major ones, so this is
/// `Yᵀ[out, rows] = op_T(W as [in, out])[out, in] · Xᵀ[in, rows]`.
pub fn linear(out: usize, rows: usize, inp: usize) -> GemmShape {
    GemmShape { transa: true, transb: false, m: out, n: rows, k: inp, lda: inp, ldb: inp, ldc: out }
}

/// The BLAS definition of [`GemmShape`] on the host (tests compare the layouts with it).
pub fn host_gemm(s: GemmShape, a: &[f32], b: &[f32], c: &mut [f32]) {
    for j in 0..s.n {
        for i in 0..s.m {
            let mut acc = 0f32;
            for p in 0..s.k {
                let av = if s.transa { a[p + i * s.lda] } else { a[i + p * s.lda] };
                let bv = if s.transb { b[j + p * s.ldb] } else { b[p + j * s.ldb] };
                acc += av * bv;
            }
            c[i + j * s.ldc] = acc;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(tokens: &[&[(u32, f32)]]) -> Routing {
        let mut r = Routing { offsets: vec![0], experts: Vec::new(), weights: Vec::new() };
        for t in tokens {
            for &(e, w) in *t {
                r.experts.push(e);
                r.weights.push(w);
            }
            r.offsets.push(r.experts.len() as u32);
        }
        r
    }

    #[test]
    fn linear_is_x_times_w_transposed() {
        let (out, rows, inp) = (3, 4, 5);
        let w: Vec<f32> = (0..out * inp).map(|i| i as f32 * 0.5 - 3.0).collect();
        let x: Vec<f32> = (0..rows * inp).map(|i| (i % 7) as f32 - 2.0).collect();
        let mut y = vec![0f32; rows * out];
        host_gemm(linear(out, rows, inp), &w, &x, &mut y);
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
                assert_eq!(y[r * out + o], want, "row {r} out {o}");
            }
        }
    }

    #[test]
    fn split_orders_rows_by_expert_and_keeps_every_pair_once() {
        // Experts 0..6, even ones on device 0 and odd ones on device 1; token 2 routes nowhere on device 1.
        let r =
            routing(&[&[(3, 0.5), (0, 0.25), (4, 0.25)], &[(4, 1.0)], &[(0, 0.6), (2, 0.4)], &[(5, 0.7), (3, 0.3)]]);
        let plans = split(&r, 6, 2, |e| Some(e % 2)).expect("split");
        assert_eq!(plans[0].experts, vec![(0, 0, 2), (2, 2, 1), (4, 3, 2)]);
        assert_eq!(plans[0].gather, vec![0, 2, 2, 0, 1]);
        assert_eq!(plans[1].experts, vec![(3, 0, 2), (5, 2, 1)]);
        assert_eq!(plans[1].gather, vec![0, 3, 3]);
        // Per token, its rows in expert order with their weights.
        assert_eq!(plans[0].offsets, vec![0, 2, 3, 5, 5]);
        assert_eq!(plans[0].slots, vec![0, 3, 4, 1, 2]);
        assert_eq!(plans[0].weights, vec![0.25, 0.25, 1.0, 0.6, 0.4]);
        assert_eq!(plans[1].offsets, vec![0, 1, 1, 1, 3]);
        assert_eq!(plans[1].slots, vec![0, 1, 2]);
        assert_eq!(plans[1].weights, vec![0.5, 0.3, 0.7]);
        // Every slot's row belongs to its token.
        for p in &plans {
            for t in 0..4 {
                for s in p.offsets[t]..p.offsets[t + 1] {
                    assert_eq!(p.gather[p.slots[s as usize] as usize], t as u32);
                }
            }
        }
        let err = split(&r, 6, 2, |e| (e != 5).then_some(0)).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "expert 5 is not loaded here");
        let err = split(&r, 4, 1, |_| Some(0)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with("expert 4 out of range"), "{err}");
    }

    /// The whole grouped pass emulated on the host, step by step as the kernels and cuBLAS calls do it (gather,
    /// `linear` GEMMs per expert on row offsets, SwiGLU, combine), equals the CPU backend's experts on the fixture.
    #[test]
    fn emulated_grouped_pass_equals_local_experts() {
        use moe_model::{Checkpoint, Experts, LocalExperts, ModelConfig, Residency};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen35");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).expect("config");
        let ckpt = Checkpoint::open_with(&dir, Residency::Resident).expect("checkpoint");
        let local = LocalExperts::load(&ckpt, &cfg, |_, _| true).expect("experts");
        let layer = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l)).expect("a MoE layer");
        let (h, i, ne, k) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok);
        let gate_up = ckpt.matrix_view(&format!("layers.{layer}.mlp.experts.gate_up_proj"), &[ne, 2 * i, h]);
        let down = ckpt.matrix_view(&format!("layers.{layer}.mlp.experts.down_proj"), &[ne, h, i]);
        let (Ok(gate_up), Ok(down)) = (gate_up, down) else {
            panic!("the qwen35 fixture has fused expert tensors");
        };
        let ntok = 9;
        let hidden: Vec<f32> = (0..ntok * h).map(|x| ((x * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let mut r = Routing { offsets: vec![0], experts: Vec::new(), weights: Vec::new() };
        for t in 0..ntok {
            for j in 0..k {
                r.experts.push(((t * 3 + j * 5) % ne) as u32);
                r.weights.push(1.0 / (j + 1) as f32);
            }
            r.offsets.push(r.experts.len() as u32);
        }
        let mut want = vec![0f32; ntok * h];
        local.forward(layer, &hidden, &r, &mut want).expect("cpu");

        let bf = |v: f32| half::bf16::from_f32(v).to_f32();
        let mut total = vec![0f32; ntok * h];
        for plan in split(&r, ne, 2, |e| Some(e % 2)).expect("split") {
            let rows = plan.gather.len();
            let xg: Vec<f32> = plan
                .gather
                .iter()
                .flat_map(|&t| hidden[t as usize * h..(t as usize + 1) * h].iter().map(|&v| bf(v)))
                .collect();
            let (mut gu, mut act, mut y) = (vec![0f32; rows * 2 * i], vec![0f32; rows * i], vec![0f32; rows * h]);
            for &(e, first, n) in &plan.experts {
                let w: Vec<f32> = gate_up.rows(e * 2 * i, (e + 1) * 2 * i).data().iter().map(|v| v.to_f32()).collect();
                host_gemm(linear(2 * i, n, h), &w, &xg[first * h..], &mut gu[first * 2 * i..]);
            }
            for row in 0..rows {
                for j in 0..i {
                    let g = gu[row * 2 * i + j];
                    act[row * i + j] = bf(g / (1.0 + (-g).exp()) * gu[row * 2 * i + i + j]);
                }
            }
            for &(e, first, n) in &plan.experts {
                let w: Vec<f32> = down.rows(e * h, (e + 1) * h).data().iter().map(|v| v.to_f32()).collect();
                host_gemm(linear(h, n, i), &w, &act[first * i..], &mut y[first * h..]);
            }
            for t in 0..ntok {
                for c in 0..h {
                    let mut acc = 0f32;
                    for s in plan.offsets[t]..plan.offsets[t + 1] {
                        acc += plan.weights[s as usize] * y[plan.slots[s as usize] as usize * h + c];
                    }
                    total[t * h + c] += acc;
                }
            }
        }
        let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
        let worst = total.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale;
        eprintln!("emulated grouped pass: worst difference {worst:.2e} of the mean magnitude (bf16 activations)");
        assert!(worst < 3e-2, "worst difference {worst} of the mean magnitude");
        assert!(worst > 0.0, "bf16 activations round: the emulation is not the CPU path itself");
    }
}
