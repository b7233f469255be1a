//! Engine tests: the ML library on its own (no app, database or object store), one binary, one
//! module per area, against fixtures and the onnxruntime Python package.
mod cli;
mod dense;
mod evaluate;
#[path = "../common/fixtures.rs"]
mod fixtures;
mod qat;
mod quantize;
mod runtime;
mod train;
mod train_dense;
