//! GGUF files (llama.cpp's format, v2 and v3): header, metadata, tensor table, dequantization.
//!
//! Layout: magic `GGUF`, version u32, tensor count u64, metadata count u64, metadata key/values,
//! tensor infos (name, dims innermost-first, type, offset), padding to `general.alignment`, data.
//! The parser reads from a memory map and checks every length against the bytes that remain
//! before using it, so a corrupted or truncated file is an error, never a huge allocation or an
//! out-of-bounds read (candle's own reader allocates whatever length the file claims).
//! Dequantization is candle's (`quantized::ggml_file::qtensor_from_ggml`); blocks are copied
//! into an aligned buffer first because candle reinterprets the bytes as block structs.

pub mod llama;
pub mod tokenizer;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape, outermost first (the reverse of GGUF's `ne`), as in PyTorch.
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    /// Byte range in the file.
    pub start: usize,
    pub len: usize,
}

pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    mmap: Mmap,
}

/// The GGML type ids this reader accepts (ggml.h `enum ggml_type`).
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A bounds-checked little-endian cursor over the file's bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            bail!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                self.pos,
                self.buf.len()
            );
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A count that must fit in the remaining bytes at `min_size` bytes per item.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        if n.saturating_mul(min_size as u64) > self.remaining() as u64 {
            bail!(
                "{what} = {n} at offset {} cannot fit in the {} bytes that remain",
                self.pos - 8,
                self.remaining()
            );
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let at = self.pos;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| anyhow::anyhow!("{what} at offset {at} is not valid UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => match self.u8(key)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("metadata {key}: bool byte {b} is neither 0 nor 1"),
            },
            8 => Value::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    bail!("metadata {key}: arrays nested too deeply");
                }
                let item = self.u32(key)?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    t => bail!("metadata {key}: unknown array item type {t}"),
                };
                let n = self.count(min, key)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(item, key, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            t => bail!("metadata {key}: unknown value type {t}"),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = crate::input::open(path)?;
        // SAFETY: read-only mapping of a file lmforge never writes in place.
        let mmap =
            unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
        Self::parse(mmap, path)
            .with_context(|| format!("{}: not a valid GGUF file", path.display()))
    }

    fn parse(mmap: Mmap, path: &Path) -> Result<Self> {
        let mut c = Cursor { buf: &mmap, pos: 0 };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            bail!("magic bytes are {magic:?}, expected \"GGUF\"");
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 or 3)");
        }
        // A tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes,
        // a key/value at least 8 (key length) + 4 (type) + 1.
        let n_tensors = c.count(24, "tensor count")?;
        let n_kv = c.count(13, "metadata count")?;
        let mut metadata = HashMap::with_capacity(n_kv);
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                bail!("metadata key {key} appears twice");
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => bail!("general.alignment = {v:?} is not a power of two"),
            },
        };
        let mut raw = Vec::with_capacity(n_tensors);
        let mut seen = HashMap::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor {name}: {n_dims} dimensions (1 to 4 allowed)");
            }
            let mut shape = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                shape.push(c.u64(&name)?);
            }
            shape.reverse();
            let ty = c.u32(&name)?;
            let offset = c.u64(&name)?;
            let Some(dtype) = ggml_dtype(ty) else {
                bail!("tensor {name}: unknown or unsupported GGML type {ty}");
            };
            if seen.insert(name.clone(), ()).is_some() {
                bail!("tensor {name} appears twice in the tensor table");
            }
            raw.push((name, shape, dtype, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let file_len = mmap.len();
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, shape, dtype, offset) in raw {
            let elems = shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&e| e > 0 && e < 1 << 40)
                .with_context(|| format!("tensor {name}: shape {shape:?} is empty or too large"))?;
            let (bs, ts) = (dtype.block_size() as u64, dtype.type_size() as u64);
            if shape.last().is_some_and(|&inner| inner % bs != 0) {
                bail!(
                    "tensor {name}: rows of {} elements are not a whole number of {dtype:?} blocks of {bs}",
                    shape.last().copied().unwrap_or(0)
                );
            }
            let len = elems / bs * ts;
            if offset % alignment as u64 != 0 {
                bail!(
                    "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
                );
            }
            let start = (data_start as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len as u64 => tensors.push(TensorInfo {
                    name,
                    shape: shape.iter().map(|&d| d as usize).collect(),
                    dtype,
                    start: s as usize,
                    len: len as usize,
                }),
                _ => bail!(
                    "tensor {name} ({dtype:?} {shape:?}, {len} bytes at data offset {offset}) runs past the end of the file ({file_len} bytes)"
                ),
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            mmap,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).with_context(|| {
                format!("{}: metadata {key} must be a string", self.path.display())
            }),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).with_context(|| {
                format!(
                    "{}: metadata {key} must be a non-negative integer, got {v:?}",
                    self.path.display()
                )
            }),
        }
    }

    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?
            .with_context(|| format!("{}: missing metadata {key}", self.path.display()))
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).with_context(|| {
                format!("{}: metadata {key} must be a number", self.path.display())
            }),
        }
    }

    /// The raw bytes of a tensor (bounds were checked when the file was opened).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }

    /// Dequantizes a tensor to f32 with its row-major shape.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Tensor> {
        dequantize(t.dtype, self.bytes(t), &t.shape)
            .with_context(|| format!("{}: tensor {}", self.path.display(), t.name))
    }
}

/// Dequantizes GGML blocks to an f32 tensor of `shape` (outermost first).
pub fn dequantize(dtype: GgmlDType, bytes: &[u8], shape: &[usize]) -> Result<Tensor> {
    let elems: usize = shape.iter().product();
    let need = elems / dtype.block_size() * dtype.type_size();
    if bytes.len() != need || !elems.is_multiple_of(dtype.block_size()) {
        bail!(
            "{} bytes do not hold {elems} {dtype:?} values (expected {need})",
            bytes.len()
        );
    }
    // candle views the bytes as block structs (f16 fields): give it an 8-byte aligned copy.
    let mut aligned = vec![0u64; need.div_ceil(8)];
    let view: &mut [u8] = bytemuck_bytes(&mut aligned);
    view[..need].copy_from_slice(bytes);
    let q = qtensor_from_ggml(dtype, &view[..need], shape.to_vec(), &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?)
}

fn bytemuck_bytes(v: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no invalid bit patterns and u8 has alignment 1; the length is exact.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 8) }
}
