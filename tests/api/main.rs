//! Integration tests: one binary, one module per area. Each test starts the real application on
//! port 0 with its own database (SQLite file or a fresh PostgreSQL database) and object store.
mod architecture;
mod distill_jobs;
mod engine;
mod helpers;
mod jobs;
mod openapi;
mod prune_jobs;
mod qat;
mod quantize;
mod quantize_jobs;
mod queue;
mod runtime;
mod storage;
mod train;
mod uploads;
