//! TensorBoard event files (`--tensorboard` on any trainer): every number of every step line of
//! metrics.jsonl also goes to `RUN/tensorboard/events.out.tfevents.<time>.<host>.<pid>`, for users
//! who look at runs in TensorBoard. Written here, without TensorFlow or a protobuf crate: the
//! file is TFRecord framing (length, masked CRC-32C of the length, the bytes, masked CRC-32C of
//! the bytes) around `Event` messages — `wall_time` (1, double), `step` (2, int64), then
//! `file_version` (3, "brain.Event:2") first and `summary` (5) after, a `Summary.Value` per
//! metric with `tag` (1) and `simple_value` (2, float) — the subset TensorBoard's scalar
//! dashboard reads. A resumed run appends a new file; TensorBoard merges a directory's files.

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), headed by the version event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = wall_time();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}.{}",
            now as u64,
            crate::fsutil::hostname(),
            std::process::id()
        ));
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = Self {
            file: std::io::BufWriter::new(f),
            path,
        };
        let mut ev = Vec::new();
        field_double(&mut ev, 1, now);
        field_bytes(&mut ev, 3, b"brain.Event:2");
        w.record(&ev)?;
        Ok(w)
    }

    /// The scalars of one metrics line (its numbers other than the step), at its step.
    pub fn line(&mut self, v: &Value) -> Result<()> {
        let Some(step) = v.get("step").and_then(Value::as_i64) else {
            return Ok(());
        };
        let mut summary = Vec::new();
        for (k, x) in v.as_object().into_iter().flatten() {
            if let Some(y) = x.as_f64().filter(|_| k != "step" && !x.is_boolean()) {
                let mut val = Vec::new();
                field_bytes(&mut val, 1, k.as_bytes());
                val.push(2 << 3 | 5); // simple_value: fixed32
                val.extend((y as f32).to_le_bytes());
                field_bytes(&mut summary, 1, &val);
            }
        }
        if summary.is_empty() {
            return Ok(());
        }
        let mut ev = Vec::new();
        field_double(&mut ev, 1, wall_time());
        ev.push(2 << 3); // step: varint
        varint(&mut ev, step as u64);
        field_bytes(&mut ev, 5, &summary);
        self.record(&ev)?;
        // A live TensorBoard sees each step as it comes.
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend(len);
        rec.extend(masked_crc(&len).to_le_bytes());
        rec.extend(data);
        rec.extend(masked_crc(data).to_le_bytes());
        self.file
            .write_all(&rec)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn field_double(out: &mut Vec<u8>, field: u64, v: f64) {
    varint(out, field << 3 | 1);
    out.extend(v.to_le_bytes());
}

/// CRC-32C (Castagnoli).
pub fn crc32c(bytes: &[u8]) -> u32 {
    crate::plot::reflected_crc32(0x82F6_3B78, bytes)
}

/// TFRecord's masking of a CRC stored next to the data it covers.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_its_check_value() {
        // The CRC-32C catalogue's check value of "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
