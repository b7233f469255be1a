//! Integration tests: one binary, one module per area. Each test starts the real application on
//! port 0 with its own database (SQLite file or a fresh PostgreSQL database) and object store.
mod architecture;
mod binary;
mod cancellation;
mod distill_jobs;
#[path = "../common/fixtures.rs"]
mod fixtures;
mod helpers;
mod jobs;
mod openapi;
mod prune_jobs;
mod quantize_jobs;
mod queue;
mod segmentation;
mod storage;
mod submit;
mod teams;
mod uploads;
mod webhooks;
