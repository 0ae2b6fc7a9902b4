//! Looking at runs: reports of their metrics, evaluations and recipes (`report`), TensorBoard
//! event files (`--tensorboard`).

pub mod report;
pub mod tensorboard;
