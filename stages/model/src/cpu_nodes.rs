//! RMSNorm, SwiGLU, RoPE and the quantized linear layer as one graph node each on the CPU, for
//! training. Built from tensor ops each
//! is a chain of nodes whose intermediates stay alive for the backward pass, and candle's
//! backward adds every node's gradient into a fresh zero tensor (for RoPE it even computes the
//! gradient of the frozen cos/sin tables; for a quantized layer it keeps the quantized copies
//! of the weight and of the input to the step's end). These nodes keep only their inputs and
//! write the inputs' gradients directly: less memory and fewer passes while a student trains.
//!
//! Bit for bit the tensor ops' values, forward and backward: each formula is candle's, in its
//! order (sums of two terms are exact either way round, and candle adds a returned gradient
//! into a zero tensor, which makes every zero +0 in both paths), so a student trains to the same
//! bytes either way. The tests below compare the bits.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

/// Elements per parallel task: large enough that a task is not all overhead.
const CHUNK: usize = 1 << 14;

/// silu(g) · u for f32 tensors of one shape on the CPU. Backward: candle's rule for the product
/// (dy · u, dy · silu(g)) and for silu (ds · (sigmoid(g) · (1 - silu(g)) + silu(g)) with
/// sigmoid(g) = 1 / (exp(-g) + 1)).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

/// Whether `swiglu` serves these operands: f32 on the CPU, one shape.
pub fn supported(g: &Tensor, u: &Tensor) -> bool {
    g.device().is_cpu()
        && g.dtype() == DType::F32
        && u.dtype() == DType::F32
        && g.dims() == u.dims()
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

struct SwiGlu;

/// The f32 values of a contiguous operand.
fn values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("the {what} must be f32, not {:?}", s.dtype())
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("the {what} must be contiguous")
    };
    Ok(&v[a..b])
}

/// `f` of a tensor's f32 values, read in place (a strided tensor is made contiguous first).
fn with_values<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        candle_core::bail!("the {what} is not on the CPU")
    };
    f(values(s, l, what)?)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "cpu-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims())
        }
        let (g, u) = (values(g, gl, "gate")?, values(u, ul, "up")?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = silu(g) * u;
                }
            });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        with_values(g, "gate", |gv| {
            with_values(u, "up", |uv| {
                with_values(dy, "incoming gradient", |dyv| {
                    if dyv.len() != n || uv.len() != n {
                        candle_core::bail!("swiglu: a gradient of {} values for {n}", dyv.len())
                    }
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(gv.par_chunks(CHUNK).zip(uv.par_chunks(CHUNK)))
                        .zip(dyv.par_chunks(CHUNK))
                        .for_each(|(((dg, du), (g, u)), dy)| {
                            for i in 0..g.len() {
                                let s = silu(g[i]);
                                let sigmoid = ((-g[i]).exp() + 1.0).recip();
                                du[i] = dy[i] * s;
                                dg[i] = (dy[i] * u[i]) * (sigmoid * (1.0 - s) + s);
                            }
                        });
                    Ok(())
                })
            })
        })?;
        let dev = g.device();
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), dev)?),
            Some(Tensor::from_vec(du, u.shape(), dev)?),
        ))
    }
}

/// RoPE of x [b, t, heads, d] (a projection's output, f32) into [b, heads, t, d], with tables
/// cos/sin [t, d / 2]: `Rope::apply` of x transposed, as one node. Per pair (x1, x2) = (x[j],
/// x[j + d/2]): (x1 cos - x2 sin, x2 cos + x1 sin); backward (g1, g2) -> (g1 cos + g2 sin,
/// g2 cos - g1 sin), the tables getting no gradient.
pub fn rope_transposed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

/// Whether `rope_transposed` serves these operands: f32 on the CPU, x [b, t, heads, d] with d
/// even and tables [t, d / 2].
pub fn rope_supported(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let dims = x.dims();
    f32_cpu(x)
        && f32_cpu(cos)
        && f32_cpu(sin)
        && dims.len() == 4
        && dims[3].is_multiple_of(2)
        && cos.dims() == [dims[1], dims[3] / 2]
        && sin.dims() == cos.dims()
}

struct Rope;

/// (b, t, heads, d) of x [b, t, heads, d] with tables of [t, d / 2].
fn rope_dims(x: &[usize], cos: &[usize], sin: &[usize]) -> Result<[usize; 4]> {
    let &[b, t, h, d] = x else {
        candle_core::bail!("rope: x must be [b, t, heads, head_dim], not {x:?}")
    };
    if !d.is_multiple_of(2) || cos != [t, d / 2] || sin != cos {
        candle_core::bail!("rope: tables {cos:?} / {sin:?} for x {x:?}")
    }
    Ok([b, t, h, d])
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "cpu-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        c: &CpuStorage,
        cl: &Layout,
        s: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [b, t, h, d] = rope_dims(xl.dims(), cl.dims(), sl.dims())?;
        let (x, cos, sin) = (
            values(x, xl, "x")?,
            values(c, cl, "cos")?,
            values(s, sl, "sin")?,
        );
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        // One task per (batch, head): its t rows are contiguous in the output.
        y.par_chunks_mut(t * d).enumerate().for_each(|(bh, y)| {
            let (bi, hi) = (bh / h, bh % h);
            for (ti, y) in y.chunks_mut(d).enumerate() {
                let x = &x[((bi * t + ti) * h + hi) * d..][..d];
                let (cos, sin) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
                for j in 0..half {
                    let (x1, x2) = (x[j], x[j + half]);
                    y[j] = x1 * cos[j] - x2 * sin[j];
                    y[j + half] = x2 * cos[j] + x1 * sin[j];
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, h, t, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [_, t, h, d] = rope_dims(x.dims(), cos.dims(), sin.dims())?;
        let half = d / 2;
        let mut dx = vec![0f32; x.elem_count()];
        with_values(cos, "cos", |cos| {
            with_values(sin, "sin", |sin| {
                with_values(dy, "incoming gradient", |dy| {
                    if dy.len() != dx.len() {
                        candle_core::bail!(
                            "rope: a gradient of {} values for {}",
                            dy.len(),
                            dx.len()
                        )
                    }
                    // One task per (batch, position): its heads are contiguous in dx.
                    dx.par_chunks_mut(h * d).enumerate().for_each(|(bt, dx)| {
                        let (bi, ti) = (bt / t, bt % t);
                        let (cos, sin) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
                        for (hi, dx) in dx.chunks_mut(d).enumerate() {
                            let g = &dy[((bi * h + hi) * t + ti) * d..][..d];
                            for j in 0..half {
                                let (g1, g2) = (g[j], g[j + half]);
                                dx[j] = g1 * cos[j] + g2 * sin[j];
                                dx[j + half] = g2 * cos[j] - g1 * sin[j];
                            }
                        }
                    });
                    Ok(())
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            None,
            None,
        ))
    }
}

/// `fq(x) · fq(w)ᵀ` for f32 on the CPU, the product `Linear::forward` makes for a dense
/// weight: x [.., in] fake-quantized per token with `a_bits`, w [out, in] per channel or group
/// with `w_bits` and scales rounded to `scale`, both with straight-through gradients. The node
/// keeps x and w alone and quantizes them again in the backward pass: the quantized weights
/// (the size of the student's projections) and inputs no longer live through the step. Same
/// products as candle's (x folded to 2-D rows; dx = dy · fq(w), dw = (fq(x)ᵀ · dy)ᵀ).
pub fn quant_linear(
    x: &Tensor,
    w: &Tensor,
    a_bits: Option<u32>,
    w_bits: Option<u32>,
    w_group: Option<usize>,
    scale: quant::ScaleDtype,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        QuantLinear {
            a_bits,
            w_bits,
            w_group,
            scale,
        },
    )
}

/// Whether `quant_linear` serves x and w [out, in] with the same values as the tensor ops:
/// f32 on the CPU, and x contiguous unless it is quantized (the product folds x's rows into
/// one matrix only when it is contiguous).
pub fn quant_linear_supported(x: &Tensor, w: &Tensor, a_bits: Option<u32>) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    f32_cpu(x)
        && f32_cpu(w)
        && w.rank() == 2
        && x.rank() >= 2
        && x.dims().last() == w.dims().last()
        && (a_bits.is_some() || x.is_contiguous())
}

struct QuantLinear {
    a_bits: Option<u32>,
    w_bits: Option<u32>,
    w_group: Option<usize>,
    scale: quant::ScaleDtype,
}

impl QuantLinear {
    /// (fq(x), fq(w)), no gradient: the values the quantizers' forward passes give.
    fn operands(&self, x: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
        let xq = match self.a_bits {
            Some(b) => quant::fake_quant(x, b, None)?,
            None => x.detach(),
        };
        let wq = match self.w_bits {
            Some(b) => quant::fake_quant_scaled(w, b, self.w_group, self.scale)?,
            None => w.detach(),
        };
        Ok((xq, wq))
    }
}

impl CustomOp2 for QuantLinear {
    fn name(&self) -> &'static str {
        "cpu-quant-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        crate::graph_node::on_cpu(&[(x, xl), (w, wl)], |t| {
            let (xq, wq) = self.operands(&t[0], &t[1])?;
            crate::llama::matmul_t(&xq, &wq)
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xq, wq) = self.operands(x, w)?;
        let (inner, out) = (w.dim(1)?, w.dim(0)?);
        let rows = x.elem_count() / inner;
        let dy = dy.reshape((rows, out))?;
        // The layouts candle's product rule sees: wq.t() transposed back, xq's rows.
        let dx = match x.track_op() {
            true => Some(dy.matmul(&wq.t()?.t()?)?.reshape(x.dims())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(xq.reshape((rows, inner))?.t()?.matmul(&dy)?.t()?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// RMSNorm of f32 x [.., h] with weight w [h] on the CPU: `llama::rms_norm`'s tensor ops as one
/// node that keeps x and w alone (the chain kept x², x · r and more per norm). Forward and
/// backward follow candle's formulas and reductions step by step (sums over a row with
/// candle's own `vec_reduce_sum`, w's gradient summed over rows in order), so each value is the
/// chain's. One difference in a whole model: x's gradient arrives as one term here, as two
/// there, so where x feeds other ops too (the residual) its sum may round differently.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// Whether `rms_norm` serves x [.., h] and w [h]: f32 on the CPU.
pub fn rms_norm_supported(x: &Tensor, w: &Tensor) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    f32_cpu(x) && f32_cpu(w) && w.rank() == 1 && x.dims().last() == Some(&w.elem_count())
}

struct RmsNorm {
    eps: f32,
}

/// Candle's sum of a row of f32 (the reduction its `sum_keepdim` over the last dim runs).
fn row_sum(v: &[f32]) -> f32 {
    use candle_core::cpu::kernels::VecOps;
    let mut s = 0f32;
    // SAFETY: `v` is a live slice of v.len() values.
    unsafe { <f32 as VecOps>::vec_reduce_sum(v.as_ptr(), &mut s, v.len()) };
    s
}

impl RmsNorm {
    /// (s, r) of a row: s = sqrt(mean(x²) + eps), r = 1 / s, as the tensor ops compute them
    /// (`mean` is the sum times 1/h plus 0, `+ eps` is times 1 plus eps). `sq` is scratch.
    fn row_scale(&self, x: &[f32], sq: &mut [f32]) -> (f32, f32) {
        for (q, &v) in sq.iter_mut().zip(x) {
            *q = v * v;
        }
        let scale = (1f64 / x.len() as f64) as f32;
        let mean = row_sum(sq) * scale + 0.0;
        let s = (mean * 1.0 + self.eps).sqrt();
        (s, s.recip())
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "cpu-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (values(x, xl, "x")?, values(w, wl, "weight")?);
        let h = w.len();
        if h == 0 || x.len() % h != 0 {
            candle_core::bail!("rms-norm: rows of {h} for {} values", x.len())
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each_init(
            || vec![0f32; h],
            |sq, (y, x)| {
                let (_, r) = self.row_scale(x, sq);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = (x * r) * w;
                }
            },
        );
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let n = x.elem_count();
        let scale = (1f64 / h as f64) as f32;
        let mut dx = vec![0f32; n];
        // dy · (x r) per value, summed over rows in order afterwards for w's gradient.
        let mut dwr = if w.track_op() {
            vec![0f32; n]
        } else {
            Vec::new()
        };
        with_values(x, "x", |xv| {
            with_values(w, "weight", |wv| {
                with_values(dy, "incoming gradient", |dyv| {
                    if dyv.len() != n || xv.len() != n {
                        candle_core::bail!("rms-norm: a gradient of {} values for {n}", dyv.len())
                    }
                    let rows = dx
                        .par_chunks_mut(h)
                        .zip(xv.par_chunks(h))
                        .zip(dyv.par_chunks(h));
                    let per_row = |sq: &mut Vec<f32>,
                                   ((dx, x), dy): ((&mut [f32], &[f32]), &[f32]),
                                   dwr: Option<&mut [f32]>| {
                        let (s, r) = self.row_scale(x, sq);
                        // The product's rule: d(x r) = dy w, dx (direct) = d(x r) r, dr = Σ d(x r) x.
                        for ((q, &dy), &w) in sq.iter_mut().zip(dy).zip(wv) {
                            *q = 0.0 + dy * w;
                        }
                        for (dx, &ga) in dx.iter_mut().zip(sq.iter()) {
                            *dx = ga * r;
                        }
                        for (q, &x) in sq.iter_mut().zip(x) {
                            *q *= x;
                        }
                        let dr = 0.0 + row_sum(sq);
                        // recip, sqrt, `+ eps`, `* 1/h`, then the sum's broadcast and x².
                        let ds = 0.0 - dr / (s * s);
                        let dm = 0.0 + ((ds / s) * 0.5 + 0.0);
                        let dmean = 0.0 + (dm * 1.0 + 0.0);
                        let dsum = 0.0 + (dmean * scale + 0.0);
                        for (dx, &x) in dx.iter_mut().zip(x) {
                            *dx += (x * (0.0 + dsum)) * 2.0 + 0.0;
                        }
                        if let Some(dwr) = dwr {
                            for ((d, &dy), &x) in dwr.iter_mut().zip(dy).zip(x) {
                                *d = 0.0 + dy * (x * r);
                            }
                        }
                    };
                    if dwr.is_empty() {
                        rows.for_each_init(|| vec![0f32; h], |sq, row| per_row(sq, row, None));
                    } else {
                        rows.zip(dwr.par_chunks_mut(h)).for_each_init(
                            || vec![0f32; h],
                            |sq, (row, dwr)| per_row(sq, row, Some(dwr)),
                        );
                    }
                    Ok(())
                })
            })
        })?;
        let dw = match w.track_op() {
            true => {
                // Summed over the rows in order, as candle reduces a broadcast's gradient.
                let mut dw = vec![0f32; h];
                for row in dwr.chunks(h) {
                    for (d, &v) in dw.iter_mut().zip(row) {
                        *d += v;
                    }
                }
                Some(Tensor::from_vec(dw, w.shape(), w.device())?)
            }
            false => None,
        };
        let dx = match x.track_op() {
            true => Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            false => None,
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|x| x.to_bits())
            .collect())
    }

    /// Values in [-1, 1) from a xorshift64 generator seeded with `seed`.
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// Asserts that each named pair of bit patterns is identical, naming the first that is not.
    fn assert_same_bits(what: &str, pairs: &[(&str, &Vec<u32>, &Vec<u32>)]) {
        for (name, a, b) in pairs {
            let differ = a.iter().zip(b.iter()).filter(|(a, b)| a != b).count();
            assert_eq!(a.len(), b.len(), "{what}{name}: lengths differ");
            assert_eq!(
                differ,
                0,
                "{what}{name}: {differ} of {} values differ",
                a.len()
            );
        }
    }

    /// Against `g.silu() * u` in candle: forward and both gradients the same bits, over values
    /// from -30 to 30 (sigmoid saturates at both ends), zeros and a downstream product.
    #[test]
    fn swiglu_equals_the_tensor_ops_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let n = 7 * (3 * CHUNK / 7 + 5);
        let mut next = uniform(0x2545_f491_4f6c_dd1du64);
        let mut gv: Vec<f32> = (0..n).map(|_| next() * 30.0).collect();
        gv[0] = 0.0;
        gv[1] = -0.0;
        let uv: Vec<f32> = (0..n).map(|_| next() * 4.0).collect();
        let wv: Vec<f32> = (0..n).map(|_| next()).collect();
        let w = Tensor::from_vec(wv, (n / 7, 7), &dev)?;
        let run = |fused: bool| -> Result<[Vec<u32>; 3]> {
            let g = Var::from_vec(gv.clone(), (n / 7, 7), &dev)?;
            let u = Var::from_vec(uv.clone(), (n / 7, 7), &dev)?;
            let y = if fused {
                swiglu(g.as_tensor(), u.as_tensor())?
            } else {
                (g.as_tensor().silu()? * u.as_tensor())?
            };
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let dg = grads.get(g.as_tensor()).expect("dg");
            let du = grads.get(u.as_tensor()).expect("du");
            Ok([bits(&y)?, bits(dg)?, bits(du)?])
        };
        let (fused, ops) = (run(true)?, run(false)?);
        assert_same_bits(
            "",
            &[
                ("forward", &fused[0], &ops[0]),
                ("dg", &fused[1], &ops[1]),
                ("du", &fused[2], &ops[2]),
            ],
        );
        Ok(())
    }

    /// Against `Rope::apply` of x transposed: output and dx the same bits.
    #[test]
    fn rope_equals_the_tensor_ops_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, d) = (3, 37, 5, 16);
        let mut next = uniform(0x9e37_79b9_7f4a_7c15u64);
        let n = b * t * h * d;
        let mut xv: Vec<f32> = (0..n).map(|_| next() * 5.0).collect();
        xv[3] = 0.0;
        xv[4] = -0.0;
        let angle =
            |i: usize| (i / (d / 2)) as f64 * 1e4f64.powf(-2.0 * (i % (d / 2)) as f64 / d as f64);
        let table = |f: fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = (0..t * d / 2).map(|i| f(angle(i)) as f32).collect();
            Tensor::from_vec(v, (t, d / 2), &dev)
        };
        let rope = crate::llama::Rope {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        };
        let wv: Vec<f32> = (0..n).map(|_| next()).collect();
        let w = Tensor::from_vec(wv, (b, h, t, d), &dev)?;
        let run = |fused: bool| -> Result<[Vec<u32>; 2]> {
            let xs = Var::from_vec(xv.clone(), (b, t, h, d), &dev)?;
            let y = if fused {
                rope_transposed(xs.as_tensor(), &rope.cos, &rope.sin)?
            } else {
                crate::llama::Rope::apply(&xs.as_tensor().transpose(1, 2)?, &rope.cos, &rope.sin)?
            };
            let grads = (&y * &w)?.sum_all()?.backward()?;
            let dx = grads.get(xs.as_tensor()).expect("dx");
            Ok([bits(&y.contiguous()?)?, bits(dx)?])
        };
        assert!(rope_supported(
            &Tensor::zeros((b, t, h, d), DType::F32, &dev)?,
            &rope.cos,
            &rope.sin
        ));
        let (fused, ops) = (run(true)?, run(false)?);
        assert_same_bits(
            "",
            &[("forward", &fused[0], &ops[0]), ("dx", &fused[1], &ops[1])],
        );
        Ok(())
    }

    /// Three quantized projections of one input (as q, k, v share theirs) and a product of
    /// their outputs: through the nodes and through `Linear::forward`'s tensor ops, the same
    /// output, dx and dw bits, for A8 and W4 per channel, per group and weights alone.
    #[test]
    fn quant_linear_equals_the_tensor_ops_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, inner, out) = (2, 9, 64, 24);
        let mut next = uniform(0x1234_5678_9abc_def1u64);
        let xv: Vec<f32> = (0..b * t * inner).map(|_| next() * 3.0).collect();
        let ws: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..out * inner).map(|_| next() * 0.1).collect())
            .collect();
        for (a_bits, w_bits, group) in [
            (Some(8), Some(4), None),
            (Some(8), Some(4), Some(16)),
            (None, Some(3), None),
            (Some(8), None, None),
        ] {
            let run = |fused: bool| -> Result<Vec<Vec<u32>>> {
                let xs = Var::from_vec(xv.clone(), (b, t, inner), &dev)?;
                let wv = ws
                    .iter()
                    .map(|w| Var::from_vec(w.clone(), (out, inner), &dev))
                    .collect::<Result<Vec<_>>>()?;
                let ys = wv
                    .iter()
                    .map(|w| {
                        let (x, w) = (xs.as_tensor(), w.as_tensor());
                        if fused {
                            quant_linear(x, w, a_bits, w_bits, group, quant::ScaleDtype::F32)
                        } else {
                            let xq = match a_bits {
                                Some(bits) => quant::fake_quant_ste(x, bits, None)?,
                                None => x.clone(),
                            };
                            let wq = match w_bits {
                                Some(bits) => quant::fake_quant_scaled_ste(
                                    w,
                                    bits,
                                    group,
                                    quant::ScaleDtype::F32,
                                )?,
                                None => w.clone(),
                            };
                            crate::llama::matmul_t(&xq, &wq)
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let loss = ((&ys[0] * &ys[1])? + ys[2].sqr()?)?.sum_all()?;
                let grads = loss.backward()?;
                let mut got = vec![bits(&ys[0])?, bits(grads.get(xs.as_tensor()).expect("dx"))?];
                for w in &wv {
                    got.push(bits(grads.get(w.as_tensor()).expect("dw"))?);
                }
                Ok(got)
            };
            let (fused, ops) = (run(true)?, run(false)?);
            let names: Vec<String> = (0..fused.len()).map(|i| format!("tensor {i}")).collect();
            let pairs: Vec<_> = names
                .iter()
                .zip(fused.iter().zip(&ops))
                .map(|(n, (a, c))| (n.as_str(), a, c))
                .collect();
            assert_same_bits(&format!("{a_bits:?}/{w_bits:?}/{group:?}: "), &pairs);
        }
        Ok(())
    }

    /// Against `llama::rms_norm`'s tensor ops on rows of 576 (candle's SIMD row sums) and 37:
    /// output, dx and the weight's gradient the same bits.
    #[test]
    fn rms_norm_equals_the_tensor_ops_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let mut next = uniform(0x0bad_5eed_1234_5678u64);
        for (rows, h) in [(7, 576), (5, 37)] {
            let xv: Vec<f32> = (0..rows * h).map(|_| next() * 2.0).collect();
            let wv: Vec<f32> = (0..h).map(|_| 1.0 + next() * 0.3).collect();
            let dyv: Vec<f32> = (0..rows * h).map(|_| next()).collect();
            let dyt = Tensor::from_vec(dyv, (1, rows, h), &dev)?;
            let run = |fused: bool| -> Result<Vec<Vec<u32>>> {
                let xs = Var::from_vec(xv.clone(), (1, rows, h), &dev)?;
                let w = Var::from_vec(wv.clone(), h, &dev)?;
                let y = if fused {
                    rms_norm(xs.as_tensor(), w.as_tensor(), 1e-5)?
                } else {
                    // The tensor-op formula (`llama::rms_norm` without its dispatch).
                    let x = xs.as_tensor();
                    let r = (x.sqr()?.mean_keepdim(candle_core::D::Minus1)? + 1e-5)?
                        .sqrt()?
                        .recip()?;
                    x.broadcast_mul(&r)?.broadcast_mul(w.as_tensor())?
                };
                let grads = (&y * &dyt)?.sum_all()?.backward()?;
                Ok(vec![
                    bits(&y)?,
                    bits(grads.get(xs.as_tensor()).expect("dx"))?,
                    bits(grads.get(w.as_tensor()).expect("dw"))?,
                ])
            };
            let (fused, ops) = (run(true)?, run(false)?);
            assert_same_bits(
                &format!("h {h}: "),
                &[
                    ("forward", &fused[0], &ops[0]),
                    ("dx", &fused[1], &ops[1]),
                    ("dw", &fused[2], &ops[2]),
                ],
            );
        }
        Ok(())
    }

    #[test]
    fn refuses_what_it_does_not_serve() -> Result<()> {
        let dev = Device::Cpu;
        let g = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let u = Tensor::zeros((3, 2), DType::F32, &dev)?;
        assert!(!supported(&g, &u));
        let err = swiglu(&g, &u).unwrap_err().to_string();
        assert!(err.contains("differ"), "{err}");
        assert!(!supported(
            &g.to_dtype(DType::BF16)?,
            &g.to_dtype(DType::BF16)?
        ));
        Ok(())
    }
}
