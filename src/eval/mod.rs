//! Evaluation without weight updates.

pub mod metrics;
pub mod score;
