//! Evaluation without weight updates.

pub mod score;
