//! Reading weights from safetensors files (single or sharded HF layout), memory-mapped.
//!
//! Every tensor a model asks for is checked against the file (name, shape, dtype) and every
//! tensor in the file must be asked for, so a mismatched checkpoint is a one-line error that
//! names the tensor and both shapes instead of a silently half-loaded model.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{tensor::TensorInfo, Dtype, SafeTensors};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

struct File {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    infos: HashMap<String, TensorInfo>,
}

pub struct WeightSource {
    files: Vec<File>,
    /// tensor name in the file → index into `files`
    names: HashMap<String, usize>,
    /// Tensors already in memory (dequantized GGUF weights), with a label for messages.
    mem: HashMap<String, Tensor>,
    mem_label: String,
    used: RefCell<BTreeSet<String>>,
    /// Alternative spellings tried when a name is absent (GPT-2 hub files lack `transformer.`).
    strip_prefixes: Vec<String>,
}

impl WeightSource {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = crate::input::read_text(&index, crate::input::MAX_CONFIG_BYTES)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", index.display()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: missing weight_map", index.display()))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };
        Self::open_files(&paths)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut names = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let f = crate::input::open(path)?;
            // SAFETY: the file is opened read-only; lmforge never writes a weights file in place
            // (checkpoints are written elsewhere and renamed), so the mapping stays valid.
            let mmap =
                unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?;
            if let Some(name) = duplicate_header_key(&mmap) {
                bail!(
                    "{}: not a valid safetensors file: tensor {name} appears twice in the header",
                    path.display()
                );
            }
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display())
            })?;
            let mut infos = HashMap::new();
            for (name, info) in meta.tensors() {
                if names.insert(name.clone(), i).is_some() {
                    bail!(
                        "{}: tensor {name} appears in more than one file",
                        path.display()
                    );
                }
                infos.insert(name, info.clone());
            }
            files.push(File {
                path: path.clone(),
                mmap,
                header_len,
                infos,
            });
        }
        Ok(Self {
            files,
            names,
            mem: HashMap::new(),
            mem_label: String::new(),
            used: RefCell::new(BTreeSet::new()),
            strip_prefixes: Vec::new(),
        })
    }

    /// Weights that are already tensors (f32 or any float dtype), e.g. dequantized from GGUF.
    pub fn from_tensors(label: String, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            files: Vec::new(),
            names: HashMap::new(),
            mem: tensors,
            mem_label: label,
            used: RefCell::new(BTreeSet::new()),
            strip_prefixes: Vec::new(),
        }
    }

    pub fn with_strip_prefix(mut self, prefix: &str) -> Self {
        self.strip_prefixes.push(prefix.to_string());
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// Every tensor name the weights hold (as stored, before any prefix stripping).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.names.keys().chain(self.mem.keys()).cloned().collect();
        v.sort();
        v
    }

    /// The shape of tensor `name`, if the weights hold it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let key = self.resolve(name)?;
        match self.mem.get(&key) {
            Some(t) => Some(t.dims().to_vec()),
            None => Some(self.files[self.names[&key]].infos[&key].shape.clone()),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains_key(name) || self.mem.contains_key(name)
    }

    fn resolve(&self, name: &str) -> Option<String> {
        if self.has(name) {
            return Some(name.to_string());
        }
        self.strip_prefixes
            .iter()
            .filter_map(|p| name.strip_prefix(p.as_str()))
            .find(|n| self.has(n))
            .map(str::to_string)
    }

    fn describe(&self) -> String {
        match self.files.as_slice() {
            [] => self.mem_label.clone(),
            [one] => one.path.display().to_string(),
            many => format!("{} (+{} shards)", many[0].path.display(), many.len() - 1),
        }
    }

    /// Loads `name` as f32, checking its shape against what the model expects.
    pub fn load(&self, name: &str, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let Some(key) = self.resolve(name) else {
            bail!(
                "{}: missing tensor {name} (shape {shape:?})",
                self.describe()
            );
        };
        if let Some(t) = self.mem.get(&key) {
            if t.dims() != shape {
                bail!(
                    "{}: tensor {key} has shape {:?}, the model's config expects {shape:?}",
                    self.mem_label,
                    t.dims()
                );
            }
            let t = t.to_dtype(DType::F32)?.to_device(dev)?;
            self.used.borrow_mut().insert(key);
            return Ok(t);
        }
        let f = &self.files[self.names[&key]];
        let info = &f.infos[&key];
        if info.shape != shape {
            bail!(
                "{}: tensor {key} has shape {:?}, the model's config expects {shape:?}",
                f.path.display(),
                info.shape
            );
        }
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => bail!(
                "{}: tensor {key} has dtype {other:?}; expected a float type",
                f.path.display()
            ),
        };
        let start = 8 + f.header_len + info.data_offsets.0;
        let end = 8 + f.header_len + info.data_offsets.1;
        let bytes = &f.mmap[start..end];
        let t = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?;
        self.used.borrow_mut().insert(key);
        Ok(t.to_dtype(DType::F32)?.to_device(dev)?)
    }

    /// Errors if the files hold tensors the model never asked for (other than `ignorable`).
    pub fn check_all_used(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.borrow();
        let mut extra: Vec<&String> = self
            .names
            .keys()
            .chain(self.mem.keys())
            .filter(|n| !used.contains(*n) && !ignorable(n))
            .collect();
        extra.sort();
        if let Some(first) = extra.first() {
            bail!(
                "{}: unexpected tensor {first}{} — the weights do not belong to a model with this config.json",
                self.describe(),
                if extra.len() > 1 { format!(" (and {} more)", extra.len() - 1) } else { String::new() }
            );
        }
        Ok(())
    }
}

/// The first key that appears twice in a safetensors JSON header. serde (and so the
/// safetensors crate) keeps the last of duplicate keys silently, which would load a tensor
/// the writer did not mean.
fn duplicate_header_key(file: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = m.next_key::<String>()? {
                m.next_value::<IgnoredAny>()?;
                if !seen.insert(k.clone()) && dup.is_none() {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let len = u64::from_le_bytes(file.get(..8)?.try_into().ok()?);
    let header = file.get(8..8usize.checked_add(usize::try_from(len).ok()?)?)?;
    let mut de = serde_json::Deserializer::from_slice(header);
    de.deserialize_map(Keys).ok().flatten()
}
