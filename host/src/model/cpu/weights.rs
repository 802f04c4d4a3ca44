//! How the CPU backend keeps weights: float32 matrices (optionally rounded through another
//! precision first, to judge a device's arithmetic apart from its weight precision), norm weights
//! as loaded.

use crate::model::weights::{concat_f32, Part, WeightStore, Weights};
use crate::model::ModelError;

/// The CPU backend's weight types.
pub struct CpuWeights;

impl Weights for CpuWeights {
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
}

/// A row-major `[rows, cols]` matrix with an optional `[rows]` bias.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl CpuMatrix {
    /// Rows `first..first + count` (an expert of a stacked mixture), without the bias.
    pub fn rows(&self, first: usize, count: usize) -> &[f32] {
        &self.data[first * self.cols..(first + count) * self.cols]
    }
}

/// Builds `CpuWeights`; matrices (not norms or biases) pass through `round` when set.
#[derive(Default)]
pub struct CpuStore {
    pub round: Option<fn(f32) -> f32>,
}

impl WeightStore for CpuStore {
    type Family = CpuWeights;
    const BYTES_PER_ELEMENT: u64 = 4;

    fn matrix(&mut self, name: &str, rows: usize, cols: usize, parts: &[Part<'_>], bias: Option<&[Part<'_>]>) -> Result<CpuMatrix, ModelError> {
        let mut data = concat_f32(parts)?;
        let bias = bias.map(concat_f32).transpose()?;
        if data.len() != rows * cols || bias.as_ref().is_some_and(|b| b.len() != rows) {
            return Err(ModelError::Shape(format!("`{name}`: {} values for [{rows}, {cols}]", data.len())));
        }
        if let Some(round) = self.round {
            data.iter_mut().for_each(|v| *v = round(*v));
        }
        Ok(CpuMatrix { rows, cols, data, bias })
    }

    fn vector(&mut self, part: &Part<'_>) -> Result<Vec<f32>, ModelError> {
        part.f32()
    }
}
