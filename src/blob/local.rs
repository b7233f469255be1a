//! A directory as object store: keys are relative paths; writes go to a temporary name first and are
//! renamed into place, so readers never see half-written objects.
use super::{BlobError, BlobStore, BlobStream, Result};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use tokio_util::io::ReaderStream;

pub struct LocalBlobs {
    root: PathBuf,
}

impl LocalBlobs {
    pub fn new(root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        if key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(BlobError::Backend(format!("invalid object key `{key}`")));
        }
        Ok(self.root.join(key))
    }

    fn temp_path(&self, target: &Path) -> PathBuf {
        let name = format!(
            ".{}.{}.partial",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("blob"),
            uuid::Uuid::new_v4()
        );
        target.with_file_name(name)
    }
}

#[async_trait]
impl BlobStore for LocalBlobs {
    async fn put_file(&self, key: &str, path: &Path) -> Result<()> {
        let target = self.path(key)?;
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        // Same filesystem: a rename is instant. Otherwise copy to a temporary name, then rename.
        if tokio::fs::rename(path, &target).await.is_ok() {
            return Ok(());
        }
        let tmp = self.temp_path(&target);
        tokio::fs::copy(path, &tmp).await?;
        tokio::fs::rename(&tmp, &target).await?;
        Ok(())
    }

    async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<()> {
        let target = self.path(key)?;
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let tmp = self.temp_path(&target);
        tokio::fs::write(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, &target).await?;
        Ok(())
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<()> {
        let source = self.path(key)?;
        match tokio::fs::copy(&source, path).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(BlobError::NotFound(key.into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get_stream(&self, key: &str) -> Result<BlobStream> {
        let file = match tokio::fs::File::open(self.path(key)?).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(key.into()))
            }
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata().await?.len();
        Ok(BlobStream {
            len,
            body: ReaderStream::with_capacity(file, 256 * 1024).boxed(),
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match tokio::fs::remove_file(self.path(key)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn presigned_get(&self, _key: &str, _ttl: std::time::Duration) -> Result<Option<String>> {
        Ok(None)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut dirs = vec![root.clone()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir)? {
                    let entry = entry?;
                    let path = entry.path();
                    let meta = entry.metadata()?;
                    if meta.is_dir() {
                        dirs.push(path);
                        continue;
                    }
                    let Ok(rel) = path.strip_prefix(&root) else {
                        continue;
                    };
                    let key = rel
                        .to_string_lossy()
                        .replace(std::path::MAIN_SEPARATOR, "/");
                    // Probes and half-written files are not objects.
                    if key.starts_with(&prefix)
                        && !key.starts_with(".readyz.")
                        && !key.contains(".partial")
                    {
                        out.push((key, meta.len()));
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| BlobError::Backend(e.to_string()))?
    }

    async fn check(&self) -> Result<()> {
        let probe = self.root.join(format!(".readyz.{}", uuid::Uuid::new_v4()));
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}
