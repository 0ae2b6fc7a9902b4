//! Training methods, one module each, plus what they share (optimizer, checkpoints).

pub mod checkpoint;
pub mod classify;
pub mod mlm;
pub mod ner;
pub mod optim;
pub mod pretrain;
pub mod qa;
pub mod sft;
