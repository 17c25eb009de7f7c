//! A bound on what a Parquet footer can make the reader allocate.
//!
//! The parquet crate decodes the footer (Thrift compact protocol) trusting each list's length:
//! a 2.6 KB shard claiming 10^8 schema elements made it ask for 8.9 GB, another for 221 GB
//! (found by fuzz/fuzz_targets/corpus.rs). Before the crate sees a shard, `check` walks the
//! footer's structure and refuses any list, set, map or byte string longer than the bytes that
//! remain, which bounds every allocation by a small multiple of the file's size.

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom};

/// Nesting deeper than any Parquet footer has.
const MAX_DEPTH: usize = 64;

/// Checks the footer of the Parquet file `f`.
pub fn check(f: &mut std::fs::File) -> Result<()> {
    let len = f.metadata().context("reading the file's size")?.len();
    if len < 12 {
        bail!("{len} bytes is too short for a Parquet file");
    }
    let mut tail = [0u8; 8];
    f.seek(SeekFrom::End(-8))?;
    f.read_exact(&mut tail)?;
    if &tail[4..] != b"PAR1" {
        bail!("no Parquet magic at the end (truncated?)");
    }
    let footer = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    if footer > len - 12 {
        bail!("the footer claims {footer} bytes in a file of {len}");
    }
    let mut buf = vec![0u8; footer as usize];
    f.seek(SeekFrom::End(-8 - footer as i64))?;
    f.read_exact(&mut buf)?;
    f.seek(SeekFrom::Start(0))?;
    let mut r = Reader { buf: &buf, pos: 0 };
    r.skip(STRUCT, 0)
        .map_err(|e| anyhow::anyhow!("corrupt Parquet footer: {e}"))
}

const STRUCT: u8 = 12;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.buf.get(self.pos).ok_or("ends inside a value")?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    fn advance(&mut self, n: u64) -> Result<(), String> {
        if n > self.remaining() as u64 {
            return Err(format!(
                "a value of {n} bytes with {} left",
                self.remaining()
            ));
        }
        self.pos += n as usize;
        Ok(())
    }

    /// Skips one value of compact type `ty`.
    fn skip(&mut self, ty: u8, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("nested too deep".into());
        }
        match ty {
            // Booleans carry their value in the type (in a list, one byte each: see below).
            1 | 2 => Ok(()),
            3 => self.advance(1),
            4..=6 => self.varint().map(|_| ()),
            7 => self.advance(8),
            8 => {
                let n = self.varint()?;
                self.advance(n)
            }
            9 | 10 => {
                let h = self.byte()?;
                let elem = h & 0x0f;
                let n = match h >> 4 {
                    15 => self.varint()?,
                    n => u64::from(n),
                };
                // Every element takes at least one byte.
                if n > self.remaining() as u64 {
                    return Err(format!(
                        "a list of {n} elements with {} bytes left",
                        self.remaining()
                    ));
                }
                for _ in 0..n {
                    if elem == 1 || elem == 2 {
                        self.advance(1)?;
                    } else {
                        self.skip(elem, depth + 1)?;
                    }
                }
                Ok(())
            }
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                if n.saturating_mul(2) > self.remaining() as u64 {
                    return Err(format!(
                        "a map of {n} entries with {} bytes left",
                        self.remaining()
                    ));
                }
                let kv = self.byte()?;
                for _ in 0..n {
                    self.skip(kv >> 4, depth + 1)?;
                    self.skip(kv & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            STRUCT => loop {
                let h = self.byte()?;
                if h == 0 {
                    return Ok(());
                }
                if h >> 4 == 0 {
                    // A long-form field id follows.
                    self.varint()?;
                }
                self.skip(h & 0x0f, depth + 1)?;
            },
            other => Err(format!("unknown value type {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(bytes: &[u8]) -> Result<(), String> {
        Reader { buf: bytes, pos: 0 }.skip(STRUCT, 0)
    }

    #[test]
    fn our_own_shards_pass() -> Result<()> {
        let dir = crate::testutil::TestDir::new("footer-ok")?;
        let p = dir.path().join("s.parquet");
        let samples = crate::shard::tests::make_samples(0, 40, true);
        crate::shard::write_shard(&p, &samples, true)?;
        check(&mut std::fs::File::open(&p)?)
    }

    #[test]
    fn lengths_beyond_the_footer_are_refused() {
        // Field 2 (delta 2, list): 15 << 4 | struct elements, then a varint of 10^8.
        let bomb = [0x29u8, 0xfc, 0x80, 0xc2, 0xd7, 0x2f, 0x00];
        assert!(walk(&bomb)
            .unwrap_err()
            .contains("a list of 100000000 elements"));
        // A byte string (field 1, binary) claiming 1000 bytes.
        assert!(walk(&[0x18, 0xe8, 0x07, 0x00])
            .unwrap_err()
            .contains("1000 bytes"));
        // A well-formed struct: i32 field 1 = 5, binary field 2 = "ab", stop.
        assert_eq!(walk(&[0x15, 0x0a, 0x18, 0x02, b'a', b'b', 0x00]), Ok(()));
        // Truncated, and nested without end.
        assert!(walk(&[0x15]).is_err());
        assert!(walk(&[0x1c; 200]).unwrap_err().contains("nested too deep"));
    }
}
