//! Shrink: a self-hosted model-optimization service.
//!
//! # Layout
//! - [`config`]: every setting, from flags and `SHRINK_*` environment variables.
//! - [`domain`]: jobs, specs, summaries and reports — plain data with validation.
//! - [`engine`]: the ML library: ONNX I/O, datasets, ONNX Runtime, measurements. No web or database code.
//! - [`store`]: the database (PostgreSQL or SQLite through sqlx): rows and the job queue.
//! - [`blob`]: artifact storage behind one trait: S3 or a local directory.
//! - [`ingest`]: turns an uploaded byte stream into a hashed, validated, stored model or dataset.
//! - [`pipeline`]: the synchronous job pipeline: baseline, one file per stage, a measurement after
//!   each, the report. Imports the engine and the domain; no async runtime, database or web.
//! - [`worker`]: async only: claims jobs, runs the pipeline off the async runtime, stores results.
//! - [`http`]: the axum API, its errors and its OpenAPI document.
//! - [`app`]: wires everything together and runs until shutdown.
pub mod app;
pub mod blob;
pub mod cli;
pub mod config;
pub mod domain;
pub mod engine;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod pipeline;
pub mod store;
pub mod telemetry;
pub mod webhooks;
pub mod worker;
