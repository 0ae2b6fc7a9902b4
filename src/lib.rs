//! lmforge: one Rust toolkit for the whole life of a language model.
//!
//! The folder layout is a map of the pipeline:
//! - `tokenizer`, `data`: text → tokens;
//! - `model`: the decoder (GPT-2 and Llama families), its parameters and HF directories;
//! - `losses`: losses as pure functions (language modelling; preference: DPO family, ORPO, SimPO,
//!   KTO, Bradley–Terry);
//! - `peft`: one module per parameter-efficient method (`lora`), attached to `Linear` layers;
//! - `train`: the training engine (loop, checkpoints, options) and one module per method
//!   (`pretrain`, `sft`, `finetune`, `reward`, `dpo`, `kto`);
//! - `rlaif`: a local judge model labels preference pairs;
//! - `config`: options from flags, TOML configs and `--set`, one schema;
//! - `generate`: sampling with a KV cache; `eval`: scoring;
//! - `serve`: the OpenAI-compatible server (continuous batching) and the dashboard;
//! - `view`: run reports and TensorBoard event files;
//! - `bench`: the training-step benchmark.

pub mod bench;
pub mod chat;
pub mod config;
pub mod data;
pub mod dist;
pub mod eval;
pub mod fsutil;
pub mod fuzzing;
pub mod generate;
pub mod input;
pub mod kernels;
pub mod losses;
pub mod model;
pub mod outdir;
pub mod peft;
pub mod plot;
pub mod rlaif;
pub mod rng;
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod view;

/// Picks the compute device from a `--device` flag: `cpu`, `cuda` or `cuda:N`.
pub fn device(spec: &str) -> anyhow::Result<candle_core::Device> {
    match spec {
        "cpu" => Ok(candle_core::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx = s
                .strip_prefix("cuda:")
                .map(str::parse::<usize>)
                .transpose()?
                // Under mpirun, plain `cuda` is the GPU of this rank's place on its node.
                .unwrap_or_else(|| {
                    std::env::var("OMPI_COMM_WORLD_LOCAL_RANK")
                        .ok()
                        .filter(|_| dist::world().size > 1)
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0)
                });
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!("--device {s}: this lmforge was built without the `cuda` feature");
            }
            #[cfg(feature = "cuda")]
            // SAFETY: only tries to dlopen the driver library (cudarc loads it lazily and
            // panics when it is missing).
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                anyhow::bail!(
                    "--device {s}: the NVIDIA driver's library (libcuda.so) cannot be loaded: \
                     no GPU driver on this machine, or it is not on LD_LIBRARY_PATH"
                );
            }
            Ok(candle_core::Device::new_cuda(idx)?)
        }
        other => anyhow::bail!("--device {other:?}: expected cpu, cuda or cuda:N"),
    }
}
