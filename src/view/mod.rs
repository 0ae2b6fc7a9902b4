//! Looking at runs: reports of their metrics, evaluations and recipes (`report`).

pub mod report;
