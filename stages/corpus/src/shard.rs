//! One corpus shard: a Parquet file of generated samples.
//!
//! Schema (see DESIGN.md, "Generation"):
//! `sample_id: uint64`, `tokens: list<uint32>` (items non-null),
//! `greedy_prefix: uint8`, `finish: utf8` ("eos" / "length"), and optionally
//! `text: utf8`. Files are zstd-compressed and byte-deterministic: the same
//! samples always give the same bytes, so a shard's hash identifies its content
//! and a regenerated shard can be compared with the one on disk.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, ArrayRef, ListArray, StringArray, UInt32Array, UInt64Array, UInt8Array};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::fsio;

/// zstd level of the shards. Fixed: changing it changes every shard hash.
const ZSTD_LEVEL: i32 = 3;

/// Written into the Parquet footer instead of the library's default, so a
/// parquet crate upgrade alone does not change shard bytes.
const CREATED_BY: &str = "distill corpus shard writer v1";

/// Why generation of a sample stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// The model produced its end-of-sequence token.
    Eos,
    /// The sample reached `max_tokens`.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
        }
    }

    pub fn parse(s: &str) -> Option<Finish> {
        match s {
            "eos" => Some(Finish::Eos),
            "length" => Some(Finish::Length),
            _ => None,
        }
    }
}

impl std::fmt::Display for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Global sample index; with the run seed it fixes all of the sample's randomness.
    pub sample_id: u64,
    /// Generated token ids, first token included.
    pub tokens: Vec<u32>,
    /// How many leading tokens were chosen greedily (first token included).
    pub greedy_prefix: u8,
    pub finish: Finish,
    /// Decoded text, stored only when the corpus is configured to keep it.
    pub text: Option<String>,
}

/// What a corpus manifest records about one shard file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name relative to the corpus folder.
    pub file: String,
    pub rows: u64,
    /// Total number of tokens over all rows.
    pub tokens: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// `sample_id` of the first row (0 for an empty shard).
    pub first_sample: u64,
}

/// The file name of shard `index`: `shard-00000.parquet`.
pub fn shard_file_name(index: usize) -> String {
    format!("shard-{index:05}.parquet")
}

/// The Arrow schema of a shard, with or without the `text` column.
pub fn shard_schema(with_text: bool) -> Schema {
    let mut fields = vec![
        Field::new("sample_id", DataType::UInt64, false),
        Field::new("tokens", tokens_type(), false),
        Field::new("greedy_prefix", DataType::UInt8, false),
        Field::new("finish", DataType::Utf8, false),
    ];
    if with_text {
        // Nullable: a sample may lack text even in a corpus that keeps it.
        fields.push(Field::new("text", DataType::Utf8, true));
    }
    Schema::new(fields)
}

fn tokens_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::UInt32, false)))
}

/// Encodes `samples` as shard bytes (deterministic; nothing written to disk).
pub fn encode_shard(samples: &[Sample], with_text: bool) -> Result<Vec<u8>> {
    let schema = Arc::new(shard_schema(with_text));

    let ids = UInt64Array::from_iter_values(samples.iter().map(|s| s.sample_id));
    let offsets = OffsetBuffer::<i32>::from_lengths(samples.iter().map(|s| s.tokens.len()));
    let values =
        UInt32Array::from_iter_values(samples.iter().flat_map(|s| s.tokens.iter().copied()));
    let item = Arc::new(Field::new("item", DataType::UInt32, false));
    let tokens = ListArray::try_new(item, offsets, Arc::new(values), None)
        .context("building the tokens column")?;
    let greedy = UInt8Array::from_iter_values(samples.iter().map(|s| s.greedy_prefix));
    let finish = StringArray::from_iter_values(samples.iter().map(|s| s.finish.as_str()));

    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(ids),
        Arc::new(tokens),
        Arc::new(greedy),
        Arc::new(finish),
    ];
    if with_text {
        let text: StringArray = samples.iter().map(|s| s.text.as_deref()).collect();
        columns.push(Arc::new(text));
    }
    let batch =
        RecordBatch::try_new(schema.clone(), columns).context("building the record batch")?;

    let level = ZstdLevel::try_new(ZSTD_LEVEL).context("zstd level")?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_created_by(CREATED_BY.to_string())
        // One row group per shard: shards hold a few thousand rows.
        .set_max_row_group_size(samples.len().max(1))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), schema, Some(props))
        .context("creating the Parquet writer")?;
    writer.write(&batch).context("encoding the shard")?;
    writer.into_inner().context("finishing the Parquet file")
}

/// Writes `samples` to `path` (temp file, fsync, rename) and returns the
/// manifest entry for it. `text` is stored only when `with_text`.
pub fn write_shard(path: &Path, samples: &[Sample], with_text: bool) -> Result<ShardEntry> {
    let file = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("shard path {} has no UTF-8 file name", path.display()))?
        .to_string();
    let bytes = encode_shard(samples, with_text)
        .with_context(|| format!("encoding shard {}", path.display()))?;
    fsio::write_atomic(path, &bytes)?;
    Ok(ShardEntry {
        file,
        rows: samples.len() as u64,
        tokens: samples.iter().map(|s| s.tokens.len() as u64).sum(),
        bytes: bytes.len() as u64,
        sha256: fsio::sha256_bytes(&bytes),
        first_sample: samples.first().map_or(0, |s| s.sample_id),
    })
}

/// Reads a shard back. Errors name the file, and the column for schema problems.
pub fn read_shard(path: &Path) -> Result<Vec<Sample>> {
    // The parquet crate panics on some malformed pages (found by fuzz/fuzz_targets/corpus.rs:
    // a level length beyond its page); a corrupt file must be an error naming it, not a crash.
    std::panic::catch_unwind(|| read_shard_inner(path))
        .unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(anyhow::anyhow!(
                "not a readable Parquet file (corrupt: the reader failed with {why:?})"
            ))
        })
        .with_context(|| format!("reading shard {}", path.display()))
}

fn read_shard_inner(path: &Path) -> Result<Vec<Sample>> {
    let mut f = File::open(path).context("opening the file")?;
    crate::footer::check(&mut f).context("not a readable Parquet file (truncated or corrupt?)")?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f)
        .context("not a readable Parquet file (truncated or corrupt?)")?;
    let schema = builder.schema().clone();
    check_schema(&schema)?;
    let has_text = schema.column_with_name("text").is_some();
    let reader = builder.build().context("opening the row reader")?;

    let mut samples = Vec::new();
    for batch in reader {
        let batch = batch.context("decoding rows (truncated or corrupt file?)")?;
        decode_batch(&batch, has_text, samples.len(), &mut samples)?;
    }
    Ok(samples)
}

/// Checks column presence and types before decoding, for clear messages.
fn check_schema(schema: &Schema) -> Result<()> {
    let want: [(&str, DataType, &str); 4] = [
        ("sample_id", DataType::UInt64, "uint64"),
        ("tokens", tokens_type(), "list<uint32>"),
        ("greedy_prefix", DataType::UInt8, "uint8"),
        ("finish", DataType::Utf8, "utf8"),
    ];
    for (name, ty, ty_name) in want {
        let Some((_, field)) = schema.column_with_name(name) else {
            bail!("missing column `{name}` (expected {ty_name})");
        };
        let ok = match (field.data_type(), &ty) {
            // Accept any item field name / nullability; null items are rejected per row.
            (DataType::List(got), DataType::List(_)) => got.data_type() == &DataType::UInt32,
            (got, want) => got == want,
        };
        if !ok {
            bail!(
                "column `{name}` has type {}, expected {ty_name}",
                field.data_type()
            );
        }
    }
    if let Some((_, field)) = schema.column_with_name("text") {
        if field.data_type() != &DataType::Utf8 {
            bail!(
                "column `text` has type {}, expected utf8",
                field.data_type()
            );
        }
    }
    Ok(())
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .with_context(|| format!("column `{name}` missing or of an unexpected type"))
}

fn no_nulls(array: &dyn Array, name: &str) -> Result<()> {
    if array.null_count() > 0 {
        bail!("column `{name}` has {} null values", array.null_count());
    }
    Ok(())
}

fn decode_batch(
    batch: &RecordBatch,
    has_text: bool,
    first_row: usize,
    out: &mut Vec<Sample>,
) -> Result<()> {
    let ids = column::<UInt64Array>(batch, "sample_id")?;
    let tokens = column::<ListArray>(batch, "tokens")?;
    let greedy = column::<UInt8Array>(batch, "greedy_prefix")?;
    let finish = column::<StringArray>(batch, "finish")?;
    no_nulls(ids, "sample_id")?;
    no_nulls(tokens, "tokens")?;
    no_nulls(tokens.values().as_ref(), "tokens (items)")?;
    no_nulls(greedy, "greedy_prefix")?;
    no_nulls(finish, "finish")?;
    let text = if has_text {
        Some(column::<StringArray>(batch, "text")?)
    } else {
        None
    };
    let values = tokens
        .values()
        .as_any()
        .downcast_ref::<UInt32Array>()
        .context("column `tokens` items are not uint32")?;
    let offsets = tokens.value_offsets();

    out.reserve(batch.num_rows());
    for row in 0..batch.num_rows() {
        let start = offsets[row] as usize;
        let end = offsets[row + 1] as usize;
        let finish_str = finish.value(row);
        let Some(fin) = Finish::parse(finish_str) else {
            bail!(
                "row {}: column `finish` is {finish_str:?}, expected \"eos\" or \"length\"",
                first_row + row
            );
        };
        out.push(Sample {
            sample_id: ids.value(row),
            tokens: values.values()[start..end].to_vec(),
            greedy_prefix: greedy.value(row),
            finish: fin,
            text: text.and_then(|t| (!t.is_null(row)).then(|| t.value(row).to_string())),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::TestDir;

    /// A small deterministic set of samples, ids `first..first+n`.
    pub(crate) fn make_samples(first: u64, n: usize, with_text: bool) -> Vec<Sample> {
        (0..n as u64)
            .map(|i| {
                let id = first + i;
                let len = (id * 7 % 13) as usize; // includes empty samples
                Sample {
                    sample_id: id,
                    tokens: (0..len as u32)
                        .map(|t| (t * 31 + id as u32 * 17) % 100)
                        .collect(),
                    greedy_prefix: (3 + id % 3) as u8,
                    finish: if len == 12 {
                        Finish::Length
                    } else {
                        Finish::Eos
                    },
                    text: (with_text && id % 4 != 1).then(|| format!("sample {id} ✓")),
                }
            })
            .collect()
    }

    #[test]
    fn file_names() {
        assert_eq!(shard_file_name(0), "shard-00000.parquet");
        assert_eq!(shard_file_name(123), "shard-00123.parquet");
    }

    #[test]
    fn round_trip_with_and_without_text() -> Result<()> {
        let dir = TestDir::new("shard-rt")?;
        for with_text in [false, true] {
            let samples = make_samples(40, 25, with_text);
            let path = dir.path().join(shard_file_name(with_text as usize));
            let entry = write_shard(&path, &samples, with_text)?;
            let back = read_shard(&path)?;
            assert_eq!(back, samples);
            if !with_text {
                assert!(back.iter().all(|s| s.text.is_none()));
            } else {
                assert!(back.iter().any(|s| s.text.is_none()));
                assert_eq!(back[0].text.as_deref(), Some("sample 40 ✓"));
            }
            assert_eq!(entry.file, shard_file_name(with_text as usize));
            assert_eq!(entry.rows, 25);
            assert_eq!(
                entry.tokens,
                samples.iter().map(|s| s.tokens.len() as u64).sum::<u64>()
            );
            assert_eq!(entry.bytes, std::fs::metadata(&path)?.len());
            assert_eq!(entry.sha256, fsio::sha256_file(&path)?);
            assert_eq!(entry.first_sample, 40);
        }
        // Text given but not kept: dropped on write.
        let samples = make_samples(0, 5, true);
        let path = dir.path().join("dropped.parquet");
        write_shard(&path, &samples, false)?;
        assert!(read_shard(&path)?.iter().all(|s| s.text.is_none()));
        Ok(())
    }

    #[test]
    fn empty_shard_round_trips() -> Result<()> {
        let dir = TestDir::new("shard-empty")?;
        let path = dir.path().join("e.parquet");
        let entry = write_shard(&path, &[], false)?;
        assert_eq!((entry.rows, entry.tokens, entry.first_sample), (0, 0, 0));
        assert!(read_shard(&path)?.is_empty());
        Ok(())
    }

    #[test]
    fn writes_are_byte_deterministic() -> Result<()> {
        let dir = TestDir::new("shard-det")?;
        for with_text in [false, true] {
            let a = dir.path().join(format!("a{with_text}.parquet"));
            let b = dir.path().join(format!("b{with_text}.parquet"));
            let ea = write_shard(&a, &make_samples(0, 300, with_text), with_text)?;
            let eb = write_shard(&b, &make_samples(0, 300, with_text), with_text)?;
            assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?);
            assert_eq!(ea.sha256, eb.sha256);
        }
        Ok(())
    }

    #[test]
    fn truncated_and_garbage_files_name_the_path() -> Result<()> {
        let dir = TestDir::new("shard-bad")?;
        let path = dir.path().join("cut.parquet");
        write_shard(&path, &make_samples(0, 50, true), true)?;
        let bytes = std::fs::read(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() - 100])?;
        let msg = format!("{:#}", read_shard(&path).unwrap_err());
        assert!(msg.contains("cut.parquet"), "{msg}");
        assert!(msg.contains("truncated or corrupt"), "{msg}");

        let garbage = dir.path().join("garbage.parquet");
        std::fs::write(&garbage, b"this is not a parquet file at all, just text")?;
        let msg = format!("{:#}", read_shard(&garbage).unwrap_err());
        assert!(msg.contains("garbage.parquet"), "{msg}");

        let missing = dir.path().join("missing.parquet");
        let msg = format!("{:#}", read_shard(&missing).unwrap_err());
        assert!(msg.contains("missing.parquet"), "{msg}");
        Ok(())
    }

    fn write_batch(path: &Path, batch: RecordBatch) -> Result<()> {
        let mut w = ArrowWriter::try_new(File::create(path)?, batch.schema(), None)?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    }

    #[test]
    fn wrong_schema_names_column() -> Result<()> {
        let dir = TestDir::new("shard-schema")?;

        // `tokens` missing.
        let schema = Arc::new(Schema::new(vec![
            Field::new("sample_id", DataType::UInt64, false),
            Field::new("greedy_prefix", DataType::UInt8, false),
            Field::new("finish", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from(vec![1u64])),
                Arc::new(UInt8Array::from(vec![3u8])),
                Arc::new(StringArray::from(vec!["eos"])),
            ],
        )?;
        let p = dir.path().join("no-tokens.parquet");
        write_batch(&p, batch)?;
        let msg = format!("{:#}", read_shard(&p).unwrap_err());
        assert!(
            msg.contains("no-tokens.parquet") && msg.contains("missing column `tokens`"),
            "{msg}"
        );

        // `sample_id` of the wrong type.
        let schema = Arc::new(Schema::new(vec![
            Field::new("sample_id", DataType::Utf8, false),
            Field::new("tokens", tokens_type(), false),
            Field::new("greedy_prefix", DataType::UInt8, false),
            Field::new("finish", DataType::Utf8, false),
        ]));
        let item = Arc::new(Field::new("item", DataType::UInt32, false));
        let tokens = ListArray::try_new(
            item,
            OffsetBuffer::from_lengths([2]),
            Arc::new(UInt32Array::from(vec![5u32, 6])),
            None,
        )?;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["x"])),
                Arc::new(tokens),
                Arc::new(UInt8Array::from(vec![3u8])),
                Arc::new(StringArray::from(vec!["eos"])),
            ],
        )?;
        let p = dir.path().join("bad-type.parquet");
        write_batch(&p, batch)?;
        let msg = format!("{:#}", read_shard(&p).unwrap_err());
        assert!(
            msg.contains("bad-type.parquet") && msg.contains("column `sample_id` has type Utf8"),
            "{msg}"
        );

        // A bad `finish` value.
        let p = dir.path().join("bad-finish.parquet");
        let schema = Arc::new(shard_schema(false));
        let item = Arc::new(Field::new("item", DataType::UInt32, false));
        let tokens = ListArray::try_new(
            item,
            OffsetBuffer::from_lengths([1]),
            Arc::new(UInt32Array::from(vec![5u32])),
            None,
        )?;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from(vec![9u64])),
                Arc::new(tokens),
                Arc::new(UInt8Array::from(vec![3u8])),
                Arc::new(StringArray::from(vec!["stop"])),
            ],
        )?;
        write_batch(&p, batch)?;
        let msg = format!("{:#}", read_shard(&p).unwrap_err());
        assert!(
            msg.contains("bad-finish.parquet") && msg.contains("\"stop\""),
            "{msg}"
        );
        Ok(())
    }

    /// Reads a shard with pyarrow, when it is installed, and checks the schema
    /// other tools see.
    #[test]
    fn pyarrow_reads_shard() -> Result<()> {
        let have = std::process::Command::new("python3")
            .args(["-c", "import pyarrow"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !have {
            println!("skipping pyarrow_reads_shard: python3 with pyarrow not available");
            return Ok(());
        }
        let dir = TestDir::new("shard-pyarrow")?;
        let path = dir.path().join(shard_file_name(0));
        let samples = make_samples(10, 20, true);
        write_shard(&path, &samples, true)?;
        let script = r#"
import sys
import pyarrow as pa
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
s = t.schema
assert s.names == ["sample_id", "tokens", "greedy_prefix", "finish", "text"], s.names
assert s.field("sample_id").type == pa.uint64(), s
assert pa.types.is_list(s.field("tokens").type), s
assert s.field("tokens").type.value_type == pa.uint32(), s
assert s.field("greedy_prefix").type == pa.uint8(), s
assert s.field("finish").type == pa.string(), s
assert s.field("text").type == pa.string(), s
assert pq.ParquetFile(sys.argv[1]).metadata.row_group(0).column(0).compression == "ZSTD"
rows = t.to_pylist()
print(t.num_rows, rows[0]["sample_id"], list(rows[0]["tokens"]), rows[0]["finish"], rows[0]["text"])
"#;
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&path)
            .output()
            .context("running python3")?;
        assert!(
            out.status.success(),
            "pyarrow check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let first = &samples[0];
        let want = format!(
            "20 10 {:?} {} {}",
            first.tokens,
            first.finish,
            first.text.as_deref().unwrap_or("None")
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
        Ok(())
    }
}
