//! A projection as LR-QAT (Bondarenko et al., 2024) parameterises it: low-rank weights inside
//! the quantizer,
//!
//! ```text
//! W_hat = s * clamp(round(Phi0 + (alpha / r) A B), -2^(b-1), 2^(b-1) - 1)
//! ```
//!
//! with A: out x r (random at start), B: r x in (zero at start), Phi0 = W0 / s0 frozen and
//! stored downcast (int8 fixed point with b integer and 8 - b fraction bits, Q4.4 for b = 4,
//! or bf16), and s per output channel or per group, initialised from MinMax (s0 = max |W0| /
//! (2^(b-1) - 1)) and trained. Rounding is half to even with a straight-through gradient;
//! the clamp passes no gradient outside its range. After training the integers
//! clamp(round(Phi0 + (alpha / r) A B)) and s are the whole student ([`LowRankQWeight::merged`]
//! is the same f32 values the forward uses).
//!
//! s is trained as a multiplier m of s0 (s = s0 * m, m = 1 at start): Adam's steps are about
//! the learning rate in size whatever the parameter's scale, and s0 is ~1e-2, so a step on s
//! itself would be a 10% change at lr 1e-3.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

/// How the start scales s0 are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleInit {
    /// absmax / qmax per group (MinMax): no weight is clipped.
    #[default]
    Minmax,
    /// Per group, the shrink of the MinMax scale (1, 0.95, ..., 0.5) whose integer grid
    /// reconstructs the group with the least squared error: outliers are clipped. The grid's
    /// clipping is fixed by s0 in LR-QAT (Phi0 = W0 / s0 is frozen; a trained s rescales the
    /// whole grid), so a coarse grid (3 bits) is better started clipped.
    Mse,
}

/// The MSE clip's candidate shrinks of the MinMax scale.
const MSE_SHRINKS: [f32; 11] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5];

/// s0 [out, groups, 1] for `wg` [out, groups, g] with `bits`-bit integers in [-h, h - 1].
fn start_scales(wg: &Tensor, bits: u32, init: ScaleInit) -> Result<Tensor> {
    let dev = wg.device();
    let qmax = ((1u32 << (bits - 1)) - 1) as f32;
    let h = (1u32 << (bits - 1)) as f32;
    // True division, as the MinMax quantizer computes alpha.
    let minmax = wg
        .abs()?
        .max_keepdim(2)?
        .broadcast_div(&Tensor::new(qmax, dev)?)?;
    if init == ScaleInit::Minmax {
        return Ok(minmax);
    }
    let safe = minmax.eq(0f32)?.where_cond(&minmax.ones_like()?, &minmax)?;
    let mut best: Option<(Tensor, Tensor)> = None;
    for &c in &MSE_SHRINKS {
        let s = (&safe * f64::from(c))?;
        let q = quant::round_half_even(&wg.broadcast_div(&s)?)?.clamp(-h, h - 1.0)?;
        let err = (q.broadcast_mul(&s)? - wg)?.sqr()?.sum_keepdim(2)?;
        best = Some(match best {
            None => (err, s),
            // Strictly smaller only: ties keep the larger scale (the earlier candidate).
            Some((be, bs)) => {
                let better = err.lt(&be)?;
                (better.where_cond(&err, &be)?, better.where_cond(&s, &bs)?)
            }
        });
    }
    let (_, s) = best.expect("candidates");
    // All-zero groups keep a zero scale, as with MinMax.
    minmax.eq(0f32)?.where_cond(&minmax, &s)
}

/// How Phi0 = W0 / s0 is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhiDtype {
    /// Fixed point in one byte: b integer bits (sign included) and 8 - b fraction bits.
    Int8,
    Bf16,
}

#[derive(Clone, Debug)]
pub enum Phi0 {
    /// u8 codes c: Phi0 = (c - 128) / 2^frac_bits.
    Int8 {
        codes: Tensor,
        frac_bits: u32,
    },
    Bf16(Tensor),
}

#[derive(Clone, Debug)]
pub struct LowRankQWeight {
    pub phi0: Phi0,
    /// [out, r]
    pub a: Tensor,
    /// [r, in]
    pub b: Tensor,
    /// s0, [out, groups] (f32, frozen).
    pub s0: Tensor,
    /// The trained multiplier of s0, [out, groups] (1 at start).
    pub m: Tensor,
    /// alpha / r
    pub scale: f64,
    pub bits: u32,
    /// Values per scale along the input dimension; None = the whole row.
    pub group: Option<usize>,
}

/// q [out, in] times s [out, groups], each scale over its group of the row.
fn times(q: &Tensor, s: &Tensor) -> Result<Tensor> {
    let (out, inp) = q.dims2()?;
    let groups = s.dim(1)?;
    q.reshape((out, groups, inp / groups))?
        .broadcast_mul(&s.unsqueeze(2)?)?
        .reshape((out, inp))
}

/// W_hat = s0 m clamp(round(Phi0 + scale A B)) as one graph node of (A, B, m). The backward
/// is the straight-through estimator: round passes the gradient, the clamp passes it only
/// inside the grid, and m gets sum over each group of dW_hat q s0.
struct Quantizer {
    /// The weight's frozen parts (its A, B and m are the node's inputs).
    w: LowRankQWeight,
}

impl Quantizer {
    fn value(&self, a: &Tensor, b: &Tensor, m: &Tensor) -> Result<Tensor> {
        let (lo, hi) = self.w.bounds();
        let q = quant::round_half_even(&self.w.z(a, b)?)?.clamp(lo, hi)?;
        times(&q, &self.w.s0.mul(m)?)
    }
}

impl CustomOp3 for Quantizer {
    fn name(&self) -> &'static str {
        "lrqat-quantizer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::graph_node::on_cpu(&[(s1, l1), (s2, l2), (s3, l3)], |t| {
            self.value(&t[0], &t[1], &t[2])
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::graph_node::on_cuda(&[(s1, l1), (s2, l2), (s3, l3)], |t| {
            self.value(&t[0], &t[1], &t[2])
        })
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        m: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients made from the trainable inputs would otherwise carry (and keep
        // alive) this whole full-size computation for as long as they are kept.
        let (a, b, m, g) = (&a.detach(), &b.detach(), &m.detach(), &g.detach());
        let (lo, hi) = self.w.bounds();
        let r = quant::round_half_even(&self.w.z(a, b)?)?;
        let q = r.clamp(lo, hi)?;
        let inside = r.ge(lo)?.mul(&r.le(hi)?)?.to_dtype(DType::F32)?;
        let s0 = &self.w.s0;
        let (out, inp) = g.dims2()?;
        let groups = s0.dim(1)?;
        let g = g.to_dtype(DType::F32)?;
        let g3 = g.reshape((out, groups, inp / groups))?;
        // The same ops, in the same order, as candle's backward of the unfused graph.
        let gm = g3
            .mul(&q.reshape((out, groups, inp / groups))?)?
            .sum_keepdim(2)?
            .reshape((out, groups))?
            .mul(s0)?;
        let gq = times(&g, &s0.mul(m)?)?;
        let gab = (gq.mul(&inside)? * self.w.scale)?;
        let ga = gab.matmul(&b.t()?)?;
        let gb = a.t()?.matmul(&gab)?;
        Ok((Some(ga), Some(gb), Some(gm)))
    }
}

impl LowRankQWeight {
    /// The start from a dense weight w0 [out, in]: s0 as `init` chooses (MinMax, or the MSE
    /// clip), Phi0 = w0 / s0 stored as `phi`, the multiplier at 1; `a` [out, r] and `b`
    /// [r, in] as given.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        w0: &Tensor,
        bits: u32,
        group: Option<usize>,
        init: ScaleInit,
        phi: PhiDtype,
        a: Tensor,
        b: Tensor,
        scale: f64,
    ) -> Result<Self> {
        let (out, inp) = w0.dims2()?;
        let g = group.unwrap_or(inp);
        if g == 0 || !inp.is_multiple_of(g) {
            candle_core::bail!("group of {g} values does not divide the input dimension {inp}");
        }
        if !(2..=8).contains(&bits) {
            candle_core::bail!("bits = {bits}: allowed 2 to 8");
        }
        let w = w0.to_dtype(DType::F32)?.detach();
        let wg = w.reshape((out, inp / g, g))?;
        let s0 = start_scales(&wg, bits, init)?;
        let safe = s0.eq(0f32)?.where_cond(&s0.ones_like()?, &s0)?;
        let phi_f = wg.broadcast_div(&safe)?.reshape((out, inp))?;
        let phi0 = match phi {
            PhiDtype::Bf16 => Phi0::Bf16(phi_f.to_dtype(DType::BF16)?),
            PhiDtype::Int8 => {
                let frac_bits = 8 - bits;
                let c = quant::round_half_even(&(phi_f * f64::from(1u32 << frac_bits))?)?
                    .clamp(-128f32, 127f32)?;
                Phi0::Int8 {
                    codes: (c + 128.0)?.to_dtype(DType::U8)?,
                    frac_bits,
                }
            }
        };
        let s0 = s0.reshape((out, inp / g))?;
        Ok(Self {
            phi0,
            m: s0.ones_like()?,
            s0,
            a,
            b,
            scale,
            bits,
            group,
        })
    }

    pub fn shape(&self) -> Result<(usize, usize)> {
        Ok((self.a.dim(0)?, self.b.dim(1)?))
    }

    pub fn rank(&self) -> Result<usize> {
        self.a.dim(1)
    }

    /// Phi0 as f32 [out, in].
    pub fn phi(&self) -> Result<Tensor> {
        match &self.phi0 {
            Phi0::Bf16(p) => p.to_dtype(DType::F32),
            Phi0::Int8 { codes, frac_bits } => {
                (codes.to_dtype(DType::F32)? - 128.0)? / f64::from(1u32 << frac_bits)
            }
        }
    }

    fn bounds(&self) -> (f32, f32) {
        let h = (1u32 << (self.bits - 1)) as f32;
        (-h, h - 1.0)
    }

    /// s = s0 * m, [out, groups].
    pub fn scales(&self) -> Result<Tensor> {
        self.s0.mul(&self.m)
    }

    /// (integers as f32) * s, broadcast over each group.
    fn times_scales(&self, q: &Tensor) -> Result<Tensor> {
        times(q, &self.scales()?)
    }

    /// z = Phi0 + scale A B (f32 [out, in]).
    fn z(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.phi()? + (a.matmul(b)? * self.scale)?
    }

    /// The trained integers clamp(round(Phi0 + scale A B)) as f32 [out, in] (values only).
    pub fn integers(&self) -> Result<Tensor> {
        let z = self.z(&self.a, &self.b)?.detach();
        let (lo, hi) = self.bounds();
        quant::round_half_even(&z)?.clamp(lo, hi)
    }

    /// W_hat for the forward pass, with gradients to A, B and m: one graph node (`Quantizer`),
    /// so that the full-size intermediates (Phi0 as f32, z, its rounding, the range mask) live
    /// only inside its forward and backward.
    pub fn effective(&self) -> Result<Tensor> {
        self.a.apply_op3(
            &self.b,
            &self.m,
            Quantizer {
                w: Self {
                    a: self.a.detach(),
                    b: self.b.detach(),
                    m: self.m.detach(),
                    ..self.clone()
                },
            },
        )
    }

    /// The merged weight: integers times scales, the same f32 values as [`Self::effective`].
    pub fn merged(&self) -> Result<Tensor> {
        self.times_scales(&self.integers()?)?
            .detach()
            .to_dtype(DType::F32)
    }

    /// The merged weight as its integer grid: codes clamp(round(Phi0 + scale A B)) and
    /// scales s; `values()` of it is [`Self::merged`], bit for bit.
    pub fn grid(&self) -> Result<quant::GridWeight> {
        let (rows, cols) = self.shape()?;
        let codes: Vec<i8> = self
            .integers()?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|c| c as i8)
            .collect();
        let s = self.scales()?.to_dtype(DType::F32)?;
        let groups = s.dim(1)?;
        Ok(quant::GridWeight {
            rows,
            cols,
            bits: self.bits,
            group: cols / groups,
            codes,
            scales: s.flatten_all()?.to_vec1()?,
        })
    }

    /// Bytes the frozen part holds (Phi0 and s0).
    pub fn frozen_bytes(&self) -> usize {
        let phi = match &self.phi0 {
            Phi0::Int8 { codes, .. } => codes.elem_count(),
            Phi0::Bf16(p) => 2 * p.elem_count(),
        };
        phi + 4 * self.s0.elem_count()
    }

    pub fn device(&self) -> &Device {
        self.a.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn w0(dev: &Device) -> Tensor {
        let v: Vec<f32> = (0..6 * 8)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 40.0)
            .collect();
        Tensor::from_vec(v, (6, 8), dev).unwrap()
    }

    #[test]
    fn start_is_minmax_rounding_and_merge_equals_forward() {
        let dev = Device::Cpu;
        let w = w0(&dev);
        let a = Tensor::ones((6, 2), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
        for phi in [PhiDtype::Int8, PhiDtype::Bf16] {
            let l = LowRankQWeight::init(
                &w,
                4,
                None,
                ScaleInit::Minmax,
                phi,
                a.clone(),
                b.clone(),
                1.0,
            )
            .unwrap();
            let rtn = quant::fake_quant(&w, 4, None)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let got = l.effective().unwrap().to_vec2::<f32>().unwrap();
            // Each value is s0 * clamp(round(Phi0 as stored)): MinMax's rounding except where
            // Phi0's storage moves a value across a tie.
            let mut same = 0;
            let (phi, s0) = (
                l.phi().unwrap().to_vec2::<f32>().unwrap(),
                l.s0.to_vec2::<f32>().unwrap(),
            );
            for i in 0..6 {
                for j in 0..8 {
                    let want = phi[i][j].round_ties_even().clamp(-8.0, 7.0) * s0[i][0];
                    assert_eq!(got[i][j], want, "{phi:?}");
                    // Exact ties (this data has some: 0.125 / (0.25 / 7) = 3.5) may go the
                    // other way, one grid step.
                    assert!(
                        (got[i][j] - rtn[i][j]).abs() <= s0[i][0] * 1.0001,
                        "{i} {j}"
                    );
                    same += usize::from(got[i][j] == rtn[i][j]);
                }
            }
            assert!(same >= 44, "{same} of 48 as MinMax rounds");
            let got = l.effective().unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                l.merged().unwrap().to_vec2::<f32>().unwrap()
            );
        }
    }

    /// The MSE start never widens MinMax's grid, reconstructs each group at least as well,
    /// clips a group with an outlier, and leaves an all-zero group at scale 0.
    #[test]
    fn mse_start_clips_outliers_and_never_loses_to_minmax() {
        let dev = Device::Cpu;
        let mut v: Vec<f32> = (0..4 * 16)
            .map(|i| ((i * 29 % 31) as f32 - 15.0) / 100.0)
            .collect();
        // Group (0, 0): a spread with one value twice the rest (at 3 bits the least-error
        // grid clips it: 0.9 of MinMax's scale).
        v[..8].copy_from_slice(&[0.05, -0.12, 0.2, -0.25, 0.3, -0.08, 0.15, 0.6]);
        v[32..48].iter_mut().for_each(|x| *x = 0.0); // group (2, 0): all zero
        let w = Tensor::from_vec(v, (4, 16), &dev).unwrap();
        let wg = w.reshape((4, 2, 8)).unwrap();
        let err = |s: &Tensor| -> Vec<f32> {
            let safe = s
                .eq(0f32)
                .unwrap()
                .where_cond(&s.ones_like().unwrap(), s)
                .unwrap();
            let q = quant::round_half_even(&wg.broadcast_div(&safe).unwrap())
                .unwrap()
                .clamp(-4f32, 3f32)
                .unwrap();
            let e = (q.broadcast_mul(&safe).unwrap() - &wg).unwrap();
            e.sqr()
                .unwrap()
                .sum_keepdim(2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let minmax = start_scales(&wg, 3, ScaleInit::Minmax).unwrap();
        let mse = start_scales(&wg, 3, ScaleInit::Mse).unwrap();
        let (sm, se) = (
            minmax.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            mse.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let (em, ee) = (err(&minmax), err(&mse));
        for k in 0..8 {
            assert!(se[k] <= sm[k], "group {k}: {} > {}", se[k], sm[k]);
            assert!(ee[k] <= em[k], "group {k}: error {} > {}", ee[k], em[k]);
        }
        assert!(
            (se[0] - 0.9 * sm[0]).abs() < 1e-7,
            "the outlier's group is clipped to 0.9: {} vs {}",
            se[0],
            sm[0]
        );
        assert_eq!((sm[4], se[4]), (0.0, 0.0));
        // Through init: s0 is the MSE start, and the grid still merges as it computes.
        let (a, b) = (
            Tensor::ones((4, 2), DType::F32, &dev).unwrap(),
            Tensor::zeros((2, 16), DType::F32, &dev).unwrap(),
        );
        let l = LowRankQWeight::init(&w, 3, Some(8), ScaleInit::Mse, PhiDtype::Bf16, a, b, 1.0)
            .unwrap();
        assert_eq!(l.s0.flatten_all().unwrap().to_vec1::<f32>().unwrap(), se);
        assert_eq!(
            l.effective().unwrap().to_vec2::<f32>().unwrap(),
            l.merged().unwrap().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn gradients_reach_a_b_and_the_scales_and_stop_outside_the_grid() {
        let dev = Device::Cpu;
        let w = w0(&dev);
        let a = Var::from_tensor(&Tensor::ones((6, 1), DType::F32, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros((1, 8), DType::F32, &dev).unwrap()).unwrap();
        let mut l = LowRankQWeight::init(
            &w,
            3,
            Some(4),
            ScaleInit::Minmax,
            PhiDtype::Int8,
            a.as_tensor().clone(),
            b.as_tensor().clone(),
            1.0,
        )
        .unwrap();
        let m = Var::from_tensor(&l.m).unwrap();
        l.m = m.as_tensor().clone();
        assert_eq!(l.s0.dims(), [6, 2]);
        let g = l
            .effective()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb: Vec<f32> = g
            .get(b.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // dL/dB[0, j] = sum_i A[i, 0] * s[i, group(j)] * inside(i, j); values at the edge of
        // the 3-bit grid (-4 and 3 both inside) keep their gradient.
        let s = l.scales().unwrap().to_vec2::<f32>().unwrap();
        for (j, &v) in gb.iter().enumerate() {
            let want: f32 = (0..6).map(|i| s[i][j / 4]).sum();
            assert!((v - want).abs() < 1e-5, "{j}: {v} vs {want}");
        }
        assert!(g.get(m.as_tensor()).is_some() && g.get(a.as_tensor()).is_some());
        // Pushed far outside the grid, no gradient flows back to B.
        let far =
            Var::from_tensor(&(Tensor::ones((1, 8), DType::F32, &dev).unwrap() * 100.0).unwrap())
                .unwrap();
        l.b = far.as_tensor().clone();
        let g = l
            .effective()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = g
            .get(far.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(gb.to_scalar::<f32>().unwrap(), 0.0);
    }
}
