//! SwiGLU and RoPE as one graph node each on the CPU, for training. Built from tensor ops each
//! is a chain of nodes whose intermediates stay alive for the backward pass, and candle's
//! backward adds every node's gradient into a fresh zero tensor (for RoPE it even computes the
//! gradient of the frozen cos/sin tables). These nodes keep only their inputs and write the
//! inputs' gradients directly: less memory and fewer passes while a student trains.
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

    /// Against `g.silu() * u` in candle: forward and both gradients the same bits, over values
    /// from -30 to 30 (sigmoid saturates at both ends), zeros and a downstream product.
    #[test]
    fn swiglu_equals_the_tensor_ops_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let n = 7 * (3 * CHUNK / 7 + 5);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
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
        for (name, a, b) in [
            ("forward", &fused[0], &ops[0]),
            ("dg", &fused[1], &ops[1]),
            ("du", &fused[2], &ops[2]),
        ] {
            let differ = a.iter().zip(b).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{name}: {differ} of {n} values differ");
        }
        Ok(())
    }

    /// Against `Rope::apply` of x transposed: output and dx the same bits.
    #[test]
    fn rope_equals_the_tensor_ops_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, d) = (3, 37, 5, 16);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
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
        for (name, a, c) in [("forward", &fused[0], &ops[0]), ("dx", &fused[1], &ops[1])] {
            let differ = a.iter().zip(c).filter(|(a, c)| a != c).count();
            assert_eq!(differ, 0, "{name}: {differ} of {n} values differ");
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
