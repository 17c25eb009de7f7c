//! Round trips, packing and argument checks that need no fixture.

use quant::{
    pack_bits, parse_bits, quantize_blockwise, unpack_bits, CodeBook, FakeQuant, Granularity,
    QuantError,
};

/// Deterministic pseudo-normal test data (sum of uniforms), with a few outliers.
fn data(n: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|i| {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            if i % 97 == 0 {
                acc * 8.0
            } else {
                acc
            }
        })
        .collect()
}

#[test]
fn round_trips_stay_within_half_a_code_step() {
    let x = data(31 * 97); // 3007 values: a short last block
    for (cb, double) in [
        (CodeBook::Nf4, true),
        (CodeBook::Nf3, false),
        (CodeBook::Nf2, true),
        (CodeBook::Int(4), false),
        (CodeBook::Int(8), true),
    ] {
        let q = quantize_blockwise(&x, &[31, 97], 64, cb, double).unwrap_or_else(|e| panic!("{e}"));
        let code = cb.values();
        let max_gap = code.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
        assert!(
            q.codes.iter().all(|&c| (c as usize) < code.len()),
            "{cb:?}: code index range"
        );
        let scales = q.absmax.values();
        let deq = q.dequantize();
        assert_eq!(deq.len(), x.len());
        for (i, (a, b)) in x.iter().zip(&deq).enumerate() {
            let s = scales[i / 64];
            // Half the widest code gap, plus the scale error of double quantization.
            let true_amax = x[i / 64 * 64..((i / 64 + 1) * 64).min(x.len())]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let tol = 0.5 * max_gap * s + (s - true_amax).abs() + 1e-6;
            assert!(
                (a - b).abs() <= tol,
                "{cb:?} at {i}: {a} vs {b} (tol {tol})"
            );
        }
        // Packing round trip.
        let packed = q.packed();
        assert_eq!(packed.len(), (x.len() * cb.bits() as usize).div_ceil(8));
        assert_eq!(unpack_bits(&packed, cb.bits(), x.len()), q.codes);
    }
}

#[test]
fn bits_per_param_matches_the_design_numbers() {
    let x = data(64 * 256 * 2);
    let plain = quantize_blockwise(&x, &[x.len()], 64, CodeBook::Nf4, false).unwrap();
    assert!((plain.bits_per_param() - 4.5).abs() < 1e-12);
    let dq = quantize_blockwise(&x, &[x.len()], 64, CodeBook::Nf4, true).unwrap();
    let want = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0);
    assert!((dq.bits_per_param() - want).abs() < 1e-12);
}

#[test]
fn pack_bits_layout_and_round_trip() {
    // 4 bits: element 2j in the high nibble; an odd count pads the low nibble with 0.
    assert_eq!(pack_bits(&[0x1, 0x2, 0xF], 4), vec![0x12, 0xF0]);
    // 3 bits, MSB first: 101 110 111 001 -> 1011 1011 1001 0000
    assert_eq!(pack_bits(&[5, 6, 7, 1], 3), vec![0xBB, 0x90]);
    for bits in 1..=8u32 {
        let vals: Vec<u8> = (0..1001u32)
            .map(|i| ((i * 37 + 11) % (1 << bits)) as u8)
            .collect();
        let packed = pack_bits(&vals, bits);
        assert_eq!(packed.len(), (vals.len() * bits as usize).div_ceil(8));
        assert_eq!(unpack_bits(&packed, bits, vals.len()), vals, "bits {bits}");
    }
}

#[test]
fn settings_are_checked_with_clear_errors() {
    assert_eq!(parse_bits(16), Ok(None));
    assert_eq!(parse_bits(32), Ok(None));
    for b in 2..=8 {
        assert_eq!(parse_bits(b), Ok(Some(b)));
    }
    for b in [0, 1, 9, 12, 15, 33] {
        let e = parse_bits(b).unwrap_err();
        assert!(
            e.to_string().contains("bits") && e.to_string().contains("16"),
            "{e}"
        );
    }
    assert_eq!(FakeQuant::new(16, Granularity::PerChannel), Ok(None));
    assert_eq!(
        FakeQuant::new(4, Granularity::PerGroup(32)),
        Ok(Some(FakeQuant {
            bits: 4,
            granularity: Granularity::PerGroup(32)
        }))
    );
    let e = FakeQuant::new(4, Granularity::PerGroup(0)).unwrap_err();
    assert!(e.to_string().contains("group_size"), "{e}");

    let x = vec![0.5f32; 10];
    let e = quantize_blockwise(&x, &[3, 4], 64, CodeBook::Nf4, false).unwrap_err();
    assert!(matches!(
        e,
        QuantError::ShapeMismatch {
            len: 10,
            expected: 12,
            ..
        }
    ));
    let e = quantize_blockwise(&x, &[10], 0, CodeBook::Nf4, false).unwrap_err();
    assert!(e.to_string().contains("block_size"), "{e}");
    let e = quantize_blockwise(&x, &[10], 64, CodeBook::Int(1), false).unwrap_err();
    assert!(e.to_string().contains("int bits"), "{e}");
}

#[test]
fn zero_blocks_and_int_code_book() {
    assert_eq!(CodeBook::Int(4).values().len(), 15);
    assert_eq!(CodeBook::Int(4).values()[0], -1.0);
    assert_eq!(CodeBook::Int(4).values()[7], 0.0);
    assert_eq!(CodeBook::Int(2).values(), vec![-1.0, 0.0, 1.0]);
    // All-zero input: zero scales, zero output, no NaN anywhere.
    let x = vec![0f32; 600];
    for double in [false, true] {
        let q = quantize_blockwise(&x, &[600], 64, CodeBook::Nf4, double).unwrap();
        assert!(q.dequantize().iter().all(|v| *v == 0.0));
    }
}
