//! Domain values shared by every layer: what a job, a spec, a model summary and a report are.
//! Only serde, validation and OpenAPI schemas live here — no web, database, storage or ML crates.
pub mod dataset;
pub mod distill;
pub mod evaluate;
pub mod finetune;
pub mod ids;
pub mod job;
pub mod model;
pub mod prune;
pub mod quantize;
pub mod report;
pub mod spec;
pub mod stage;
pub mod task;
pub mod team;
pub mod training;
pub mod validation;
pub mod webhook;
