//! A projection as a frozen block-quantized base plus a trainable low-rank adapter (QLoRA,
//! LoftQ): W = dequant(Q) + (alpha / r) B A in peft's orientation (A: r x in, B: out x r).
//! The base stays quantized in memory (code indices two to a byte for code books of up to 16
//! values, one f32 scale per block) and is dequantized inside each forward pass.

use candle_core::{DType, Device, Result, Tensor};

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
    pub base: std::sync::Arc<BlockwiseWeight>,
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    /// alpha / r
    pub scale: f64,
}

impl LoraWeight {
    /// dequant(base) + scale B A, f32 [out, in].
    pub fn effective(&self) -> Result<Tensor> {
        let ba = self.b.matmul(&self.a)?;
        self.base.dequantize()? + (ba * self.scale)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
