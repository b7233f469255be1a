//! Artifact storage behind one trait: an S3-compatible bucket in production, a local directory as
//! the embedded default. Only this module knows the AWS SDK.
mod local;
pub mod s3;

pub use local::LocalBlobs;
pub use s3::S3Blobs;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BlobError {
    #[error("object not found: {0}")]
    NotFound(String),
    #[error("object storage i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("object storage: {0}")]
    Backend(String),
}

pub type Result<T, E = BlobError> = std::result::Result<T, E>;

/// A readable object: its length and a stream of its bytes.
pub struct BlobStream {
    pub len: u64,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores a local file under `key` (moving it when the store is local, so big uploads are not copied).
    async fn put_file(&self, key: &str, path: &Path) -> Result<()>;
    /// Stores bytes under `key`.
    async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<()>;
    /// Copies the object to a local file.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<()>;
    /// Streams the object.
    async fn get_stream(&self, key: &str) -> Result<BlobStream>;
    /// Removes the object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// A time-limited URL that downloads the object without the API, when the store supports it.
    async fn presigned_get(&self, key: &str, ttl: std::time::Duration) -> Result<Option<String>>;
    /// Every object whose key starts with `prefix`, with its size, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>>;
    /// Checks that the store is reachable and writable (for `/readyz`).
    async fn check(&self) -> Result<()>;
    /// Short description for logs.
    fn describe(&self) -> String;
}

/// Object keys: `<project>/<kind>/<id>` for uploads, `<project>/jobs/<id>/<name>` for artifacts.
pub fn upload_key(project: &str, kind: &str, id: &str) -> String {
    format!("{project}/{kind}/{id}")
}

pub fn artifact_key(project: &str, job_id: &str, attempt: i64, name: &str) -> String {
    format!("{project}/jobs/{job_id}/{attempt}/{name}")
}
