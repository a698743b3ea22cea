//! Compute ops for tandem's forward pass.
//!
//! What lives here: the quantized block formats that model files store weights in
//! ([`quant`]), matrix products that read those blocks directly ([`matmul`]), and the
//! small element-wise ops of a Llama-family layer ([`ops`]).
//!
//! What deliberately does not: anything about models, files or requests. This crate knows
//! byte layouts and arithmetic only, and depends on no other tandem crate, so a GPU backend
//! can sit beside the CPU one without touching the engine.
//!
//! Every op has a scalar path written for clarity; it is the reference that faster paths are
//! tested against and it always compiles.

pub mod attention;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod simd;

pub use matmul::{WeightMatrix, matmul};
pub use quant::TensorType;

/// Errors of the kernels crate: a shape or a byte buffer that does not fit the op.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// The tensor type has no kernel in this build.
    #[error("tensor type {0} has no CPU kernel")]
    UnsupportedType(TensorType),
    /// A row length is not a whole number of the type's blocks.
    #[error("row of {cols} elements is not a multiple of {ty}'s block size {block}")]
    RaggedRow { ty: TensorType, cols: usize, block: usize },
    /// A buffer holds a different number of bytes than its shape needs.
    #[error("{what}: expected {expected} bytes, got {actual}")]
    ByteLength { what: &'static str, expected: usize, actual: usize },
    /// Two operands disagree on a dimension.
    #[error("{what}: dimension mismatch, {left} vs {right}")]
    Shape { what: &'static str, left: usize, right: usize },
}
