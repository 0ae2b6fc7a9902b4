//! The decoder model: configuration, parameters, layers, weights I/O, and HF directories.

pub mod attention;
pub mod backbone;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod gguf;
pub mod hf;
pub mod layers;
pub mod limits;
pub mod loader;
pub mod packing;
pub mod params;
pub mod virtual_tokens;

pub use config::{Family, ModelConfig};
pub use decoder::{DecoderModel, ForwardOpts, KvCache, Packing};
pub use hf::LoadedModel;
pub use params::{Grads, ParamStore};
