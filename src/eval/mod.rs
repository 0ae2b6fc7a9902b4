//! Evaluation without weight updates: perplexity (`score`), the task harness (`harness`: tasks
//! as data in `task`, log-likelihoods in `loglik`, the bias probe in `bias`) and metrics as pure
//! functions (`metrics`, `bleu`, `rouge`).

pub mod bias;
pub mod bleu;
pub mod harness;
pub mod kinds;
pub mod loglik;
pub mod metrics;
pub mod porter;
pub mod rouge;
pub mod runners;
pub mod score;
pub mod task;
