//! Training: the engine every method runs on (`engine`: the loop, checkpoints, options), the
//! optimizer, and one module per training method.
//!
//! - `pretrain`: causal LM (`pretrain::causal`) and masked LM (`pretrain::masked`) on raw text;
//! - `sft`: supervised fine-tuning on prompt/completion pairs and chats;
//! - `finetune`: task heads — `classify`, `ner`, `qa`;
//! - `reward`: reward models on preference pairs (Bradley–Terry);
//! - `dpo`: DPO and its pairwise relatives, ORPO and SimPO; `kto`: KTO on unpaired examples.
//!
//! What the methods share: `lm` (a causal LM being trained: load, template, LoRA, outputs),
//! `logps` (log-probs of completions; the reference model) and `reference` (the
//! reference log-prob cache).
//!
//! A new method is one file: its batches, its loss, its outputs (docs/training-engine.md).

pub mod dpo;
pub mod engine;
pub mod finetune;
pub mod kto;
pub mod lm;
pub mod logps;
pub mod optim;
pub mod pretrain;
pub mod reference;
pub mod reward;
pub mod rl;
pub mod sft;
