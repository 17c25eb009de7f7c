//! compressed-tensors' `pack-quantized` words (read by transformers and vLLM): each row of
//! signed b-bit codes, offset by 2^(b-1), is a little-endian bit stream cut into int32 words,
//! element i at bits i*b .. i*b+b, ceil(cols * b / 32) words a row.

/// `codes` [rows, cols] row-major as [rows, ceil(cols * bits / 32)] words.
pub fn pack_int32(codes: &[i8], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    assert_eq!(codes.len(), rows * cols);
    let b = bits as usize;
    let per_row = (cols * b).div_ceil(32);
    let off = 1i64 << (bits - 1);
    let mut out = vec![0u32; rows * per_row];
    for r in 0..rows {
        let words = &mut out[r * per_row..(r + 1) * per_row];
        for (i, c) in codes[r * cols..(r + 1) * cols].iter().enumerate() {
            let u = (*c as i64 + off) as u64;
            let bit = i * b;
            let (w, s) = (bit / 32, bit % 32);
            words[w] |= (u << s) as u32;
            if s + b > 32 {
                words[w + 1] |= (u >> (32 - s)) as u32;
            }
        }
    }
    out.into_iter().map(|w| w as i32).collect()
}

/// The codes back from [`pack_int32`]'s words; `None` when the lengths do not match.
pub fn unpack_int32(words: &[i32], rows: usize, cols: usize, bits: u32) -> Option<Vec<i8>> {
    let b = bits as usize;
    let per_row = (cols * b).div_ceil(32);
    if words.len() != rows.checked_mul(per_row)? || !(1..=8).contains(&b) {
        return None;
    }
    let off = 1i64 << (bits - 1);
    let mask = (1u64 << b) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &words[r * per_row..(r + 1) * per_row];
        for i in 0..cols {
            let bit = i * b;
            let (w, s) = (bit / 32, bit % 32);
            let mut v = (row[w] as u32 as u64) >> s;
            if s + b > 32 {
                v |= (row[w + 1] as u32 as u64) << (32 - s);
            }
            out.push(((v & mask) as i64 - off) as i8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_match_the_reference_layout() {
        // 4 bits: eight codes a word, the first in the lowest nibble (offset by 8).
        let codes: Vec<i8> = vec![-8, -7, 0, 1, 2, 3, 7, -1, 5];
        let w = pack_int32(&codes, 1, 9, 4);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0] as u32, 0x7FBA_9810);
        assert_eq!(w[1], 13);
        for bits in 2..=8 {
            let lo = -(1i32 << (bits - 1));
            let codes: Vec<i8> = (0..3 * 37)
                .map(|i| (lo + (i * 5) % (1 << bits)) as i8)
                .collect();
            let w = pack_int32(&codes, 3, 37, bits as u32);
            assert_eq!(unpack_int32(&w, 3, 37, bits as u32).unwrap(), codes);
            assert!(unpack_int32(&w[1..], 3, 37, bits as u32).is_none());
        }
    }
}
