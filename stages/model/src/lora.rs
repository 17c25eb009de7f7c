//! A projection as a frozen block-quantized base plus a trainable low-rank adapter (QLoRA,
//! LoftQ): W = dequant(Q) + (alpha / r) B A in peft's orientation (A: r x in, B: out x r).
//! The base stays quantized in memory (code indices two to a byte for code books of up to 16
//! values, one f32 scale per block) and is dequantized inside each forward pass.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A block-quantized weight: value i is `code[index i] * scales[i / block]`.
#[derive(Clone, Debug)]
pub struct BlockwiseWeight {
    pub shape: (usize, usize),
    /// The code indices, row-major (u8): with up to 16 code values two to a byte (index 2j in
    /// the low nibble of byte j, 2j + 1 in the high one), else one per byte.
    pub codes: Tensor,
    /// Whether `codes` holds two indices per byte.
    pub nibbles: bool,
    /// One scale per block (f32).
    pub scales: Tensor,
    /// The code book (f32).
    pub code: Tensor,
    pub block: usize,
}

impl BlockwiseWeight {
    pub fn new(
        shape: (usize, usize),
        codes: Vec<u8>,
        block: usize,
        code: Vec<f32>,
        scales: Vec<f32>,
        device: &Device,
    ) -> Result<Self> {
        let n = shape.0 * shape.1;
        if codes.len() != n || block == 0 || scales.len() != n.div_ceil(block) {
            candle_core::bail!(
                "block-quantized weight {shape:?}: {} codes and {} scales in blocks of {block} do not fit",
                codes.len(),
                scales.len()
            );
        }
        if let Some(&c) = codes.iter().find(|&&c| c as usize >= code.len()) {
            candle_core::bail!("code index {c} outside a code book of {}", code.len());
        }
        let k = code.len();
        // A 4-bit base holds half a byte per value, as bitsandbytes stores it.
        let nibbles = k <= 16;
        let codes = if nibbles {
            codes
                .chunks(2)
                .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
                .collect()
        } else {
            codes
        };
        let len = codes.len();
        Ok(Self {
            shape,
            codes: Tensor::from_vec(codes, len, device)?,
            nibbles,
            scales: Tensor::from_vec(scales, n.div_ceil(block), device)?,
            code: Tensor::from_vec(code, k, device)?,
            block,
        })
    }

    /// The f32 weight [out, in]: code times block scale, in f32 as bitsandbytes computes it.
    pub fn dequantize(&self) -> Result<Tensor> {
        let n = self.shape.0 * self.shape.1;
        let values = self.code.index_select(&self.indices()?, 0)?;
        let full = n / self.block;
        let mut parts = Vec::with_capacity(2);
        if full > 0 {
            let v = values
                .narrow(0, 0, full * self.block)?
                .reshape((full, self.block))?;
            let s = self.scales.narrow(0, 0, full)?.reshape((full, 1))?;
            parts.push(v.broadcast_mul(&s)?.flatten_all()?);
        }
        if !n.is_multiple_of(self.block) {
            // A shorter last block.
            let v = values.narrow(0, full * self.block, n % self.block)?;
            let s = self.scales.narrow(0, full, 1)?;
            parts.push(v.broadcast_mul(&s)?);
        }
        Tensor::cat(&parts, 0)?.reshape(self.shape)
    }

    /// One code index per value ([n]), unpacked from the nibbles where packed: candle has no
    /// bitwise ops, so the split runs in f32 (exact for 0..=255).
    pub fn indices(&self) -> Result<Tensor> {
        if !self.nibbles {
            // As u32: candle's index_select reads a u8 index of 255 as "no index" (a zero).
            return self.codes.to_dtype(DType::U32);
        }
        let n = self.shape.0 * self.shape.1;
        let p = self.codes.to_dtype(DType::F32)?;
        let hi = (&p / 16.0)?.floor()?;
        let lo = (&p - (&hi * 16.0)?)?;
        Tensor::stack(&[&lo, &hi], 1)?
            .flatten_all()?
            .narrow(0, 0, n)?
            .to_dtype(DType::U8)
    }

    /// Bytes this weight holds in memory.
    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + 4 * (self.scales.elem_count() + self.code.elem_count())
    }
}

/// A frozen base with a low-rank adapter.
#[derive(Clone, Debug)]
pub struct LoraWeight {
    pub base: Arc<BlockwiseWeight>,
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    /// alpha / r
    pub scale: f64,
    /// peft's `lora_dropout` on the adapter's input while training, and this projection's
    /// number in its mask stream.
    pub dropout: Option<(Arc<LoraDropout>, u64)>,
}

impl LoraWeight {
    /// dequant(base) + scale B A, f32 [out, in].
    pub fn effective(&self) -> Result<Tensor> {
        let ba = self.b.matmul(&self.a)?;
        self.base.dequantize()? + (ba * self.scale)?
    }

    /// y = x dequant(base)ᵀ + scale · (dropout(x) Aᵀ) Bᵀ, in peft's order, x [.., in] in the
    /// compute dtype. The base's product is one graph node whose backward gives x's gradient
    /// only: candle's matmul would also compute (and keep until the step ends) a full-size
    /// gradient of the frozen base. The dequantized base lives only inside that node's forward
    /// and backward, so the base stays 4-bit between them.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = x.apply_op1(FrozenProduct {
            base: self.base.clone(),
        })?;
        let xa = match &self.dropout {
            Some((d, id)) => match d.mask(*id, x)? {
                Some(m) => (x * m)?,
                None => x.clone(),
            },
            None => x.clone(),
        };
        let dt = x.dtype();
        let low = crate::llama::matmul_t(
            &crate::llama::matmul_t(&xa, &self.a.to_dtype(dt)?)?,
            &self.b.to_dtype(dt)?,
        )?;
        base + (low * self.scale)?
    }
}

/// peft's `lora_dropout`: while a training pass is on (`begin`), each adapter's input value is
/// zeroed with probability p and the rest scaled by 1 / (1 - p). The mask is a hash of (seed,
/// pass, projection, position), not a random stream, so a resumed run and a recomputed
/// (checkpointed) block draw the same masks, on any device.
#[derive(Debug)]
pub struct LoraDropout {
    p: f64,
    seed: u64,
    /// The current training pass (a micro-batch), or `OFF` (evaluation, export).
    pass: AtomicU64,
}

const OFF: u64 = u64::MAX;

impl LoraDropout {
    pub fn new(p: f64, seed: u64) -> Self {
        Self {
            p,
            seed,
            pass: AtomicU64::new(OFF),
        }
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    /// Masks from now on are pass `key`'s (`key` < u64::MAX).
    pub fn begin(&self, key: u64) {
        self.pass.store(key.min(OFF - 1), Ordering::SeqCst);
    }

    /// No dropout until the next `begin`.
    pub fn end(&self) {
        self.pass.store(OFF, Ordering::SeqCst);
    }

    /// The mask (0 or 1 / (1 - p) per value, x's shape, dtype and device) for projection `id`,
    /// or None outside a training pass.
    fn mask(&self, id: u64, x: &Tensor) -> Result<Option<Tensor>> {
        let pass = self.pass.load(Ordering::SeqCst);
        if pass == OFF || self.p == 0.0 {
            return Ok(None);
        }
        let stream = mix(mix(mix(self.seed) ^ pass) ^ id);
        let keep = 1.0 / (1.0 - self.p);
        // A value survives when the top 24 bits of its hash, as a fraction, reach p.
        let threshold = (self.p * (1u64 << 24) as f64).ceil() as u64;
        let n = x.elem_count();
        let m: Vec<f32> = (0..n as u64)
            .map(|i| {
                if (mix(stream ^ i) >> 40) >= threshold {
                    keep as f32
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(m, x.shape(), &Device::Cpu)?
                .to_dtype(x.dtype())?
                .to_device(x.device())?,
        ))
    }
}

/// splitmix64's finaliser: a well-mixed 64-bit hash of a 64-bit key.
fn mix(z: u64) -> u64 {
    let z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// x · dequant(base)ᵀ with a backward for x alone (the base is frozen).
struct FrozenProduct {
    base: Arc<BlockwiseWeight>,
}

impl FrozenProduct {
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        let w = self
            .base
            .dequantize()?
            .to_device(x.device())?
            .to_dtype(x.dtype())?;
        crate::llama::matmul_t(x, &w)
    }
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "lora-base-product"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::graph_node::on_cpu(&[(s, l)], |t| self.product(&t[0]))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::graph_node::on_cuda(&[(s, l)], |t| self.product(&t[0]))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = self
            .base
            .dequantize()?
            .to_device(x.device())?
            .to_dtype(grad.dtype())?;
        // dx [.., in] = dy [.., out] · w [out, in]
        let dims = grad.dims();
        let rows = grad.elem_count() / dims[dims.len() - 1];
        let dx = grad.reshape((rows, dims[dims.len() - 1]))?.matmul(&w)?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn dequantize_handles_a_short_last_block() {
        let dev = Device::Cpu;
        // 2 x 5 values in blocks of 4: blocks of 4, 4 and 2.
        let codes = vec![0, 1, 2, 3, 3, 2, 1, 0, 1, 3];
        let w = BlockwiseWeight::new(
            (2, 5),
            codes.clone(),
            4,
            vec![-1.0, -0.5, 0.5, 1.0],
            vec![2.0, 3.0, 4.0],
            &dev,
        )
        .unwrap();
        let got: Vec<f32> = w
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let book = [-1.0f32, -0.5, 0.5, 1.0];
        let scales = [2.0f32, 3.0, 4.0];
        let want: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &c)| book[c as usize] * scales[i / 4])
            .collect();
        assert_eq!(got, want);
        // Ten 2-bit indices in five bytes (an odd count would leave half a byte).
        assert!(w.nibbles);
        assert_eq!(w.codes.elem_count(), 5);
        let idx: Vec<u8> = w.indices().unwrap().to_vec1().unwrap();
        assert_eq!(idx, codes);
        assert!(BlockwiseWeight::new((2, 5), codes, 4, book.to_vec(), vec![1.0; 2], &dev).is_err());
    }

    /// A base of `out` x `inp` in 16 code values, blocks of 8, with an adapter of rank 3.
    fn adapter(
        out: usize,
        inp: usize,
        dropout: Option<Arc<LoraDropout>>,
    ) -> (LoraWeight, [Var; 2]) {
        let dev = Device::Cpu;
        let codes: Vec<u8> = (0..out * inp)
            .map(|i| ((i * 7 + i / 5) % 16) as u8)
            .collect();
        let book: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 8.0).collect();
        let scales: Vec<f32> = (0..(out * inp).div_ceil(8))
            .map(|i| 0.5 + (i % 3) as f32 * 0.25)
            .collect();
        let base = BlockwiseWeight::new((out, inp), codes, 8, book, scales, &dev).unwrap();
        let a = Var::randn(0f32, 0.5, (3, inp), &dev).unwrap();
        let b = Var::randn(0f32, 0.5, (out, 3), &dev).unwrap();
        let w = LoraWeight {
            base: Arc::new(base),
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: dropout.map(|d| (d, 5)),
        };
        (w, [a, b])
    }

    /// peft's order (base product, then the adapter's) gives the merged weight's outputs and
    /// gradients for x, A and B, up to summation order.
    #[test]
    fn forward_and_gradients_match_the_merged_weight() {
        let (w, [a, b]) = adapter(12, 20, None);
        let x = Var::randn(0f32, 1.0, (2, 3, 20), &Device::Cpu).unwrap();
        let close = |p: &Tensor, q: &Tensor, what: &str| {
            let d = (p - q)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "{what}: {d}");
        };
        let y = w.forward(x.as_tensor()).unwrap();
        let merged = crate::llama::matmul_t(x.as_tensor(), &w.effective().unwrap()).unwrap();
        close(&y, &merged, "forward");
        let probe = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu).unwrap();
        let g1 = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (&merged * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (v, what) in [
            (x.as_tensor(), "x"),
            (a.as_tensor(), "A"),
            (b.as_tensor(), "B"),
        ] {
            close(g1.get(v).unwrap(), g2.get(v).unwrap(), what);
        }
    }

    /// Dropout acts only inside a pass, draws the same mask when a pass is replayed and
    /// another one in the next pass, and keeps about 1 - p of the adapter's inputs.
    #[test]
    fn dropout_masks_replay_and_switch_off() {
        let d = Arc::new(LoraDropout::new(0.25, 7));
        let (w, _) = adapter(12, 20, Some(d.clone()));
        let (plain, _) = adapter(12, 20, None);
        let plain = LoraWeight {
            a: w.a.clone(),
            b: w.b.clone(),
            ..plain
        };
        let x = Tensor::randn(0f32, 1.0, (4, 20), &Device::Cpu).unwrap();
        let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let off = v(w.forward(&x).unwrap());
        assert_eq!(off, v(plain.forward(&x).unwrap()));
        d.begin(3);
        let first = v(w.forward(&x).unwrap());
        assert_eq!(first, v(w.forward(&x).unwrap()));
        assert_ne!(first, off);
        d.begin(4);
        assert_ne!(first, v(w.forward(&x).unwrap()));
        d.end();
        assert_eq!(off, v(w.forward(&x).unwrap()));
        d.begin(3);
        let m = v(d
            .mask(
                5,
                &Tensor::zeros(100_000, DType::F32, &Device::Cpu).unwrap(),
            )
            .unwrap()
            .unwrap());
        let kept = m.iter().filter(|&&k| k != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        assert!(m.iter().all(|&k| k == 0.0 || k == 1.0 / 0.75));
    }

    /// An odd number of 4-bit indices leaves half a byte; a code book of more than 16 values
    /// keeps a byte per index, and index 255 reads its code value (candle's u8 index_select
    /// gave 0 for it).
    #[test]
    fn indices_survive_packing() {
        let dev = Device::Cpu;
        let codes = vec![15u8, 0, 7];
        let book: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let w = BlockwiseWeight::new((1, 3), codes.clone(), 2, book, vec![1.0; 2], &dev).unwrap();
        assert_eq!(w.codes.elem_count(), 2);
        assert_eq!(w.indices().unwrap().to_vec1::<u8>().unwrap(), codes);
        let wide: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let codes = vec![255u8, 16, 128];
        let w = BlockwiseWeight::new((1, 3), codes.clone(), 2, wide, vec![2.0; 2], &dev).unwrap();
        assert!(!w.nibbles);
        let got: Vec<f32> = w
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, vec![510.0, 32.0, 256.0]);
    }
}
