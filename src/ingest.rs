//! Uploads: stream the body to a temporary file while hashing it and enforcing the size limit,
//! inspect it off the async runtime, then store the object and the row. Until both are stored,
//! nothing is visible; on any failure nothing is left behind.
use crate::blob::{upload_key, BlobStore};
use crate::domain::dataset::DatasetSummary;
use crate::domain::model::ModelSummary;
use crate::engine::{self, EngineError};
use crate::store::uploads::{Upload, UploadKind};
use crate::store::{Db, StoreError};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::path::Path;
use thiserror::Error;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Error)]
pub enum IngestError {
    #[error("the upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the upload was interrupted: {0}")]
    Interrupted(String),
    /// A project quota (`limit` names it) would be exceeded; nothing was stored.
    #[error("{detail}")]
    OverQuota { limit: &'static str, detail: String },
    #[error("{0}")]
    Invalid(#[from] EngineError),
    #[error("temporary storage: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] crate::blob::BlobError),
}

/// An upload received into a temporary file, not yet stored.
pub struct Staged {
    pub file: tempfile::TempPath,
    pub size: u64,
    pub sha256: String,
}

/// Streams `body` into a temporary file under `tmp_dir`, hashing as it goes; memory stays flat.
pub async fn stage<S, E>(tmp_dir: &Path, mut body: S, limit: u64) -> Result<Staged, IngestError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    tokio::fs::create_dir_all(tmp_dir).await?;
    let path = tempfile::Builder::new()
        .prefix("upload-")
        .tempfile_in(tmp_dir)?
        .into_temp_path();
    let mut file =
        tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::create(&path).await?);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| IngestError::Interrupted(e.to_string()))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(IngestError::TooLarge { limit });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(Staged {
        file: path,
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Reads the model's summary (off the async runtime: parsing can take a while for big graphs).
pub async fn inspect_model(staged: &Staged) -> Result<ModelSummary, IngestError> {
    let path = staged.file.to_path_buf();
    let summary = tokio::task::spawn_blocking(move || {
        engine::onnx::load_model_file(&path).map(|m| engine::inspect(&m))
    })
    .await
    .map_err(|e| IngestError::Interrupted(e.to_string()))??;
    Ok(summary)
}

pub async fn inspect_dataset(staged: &Staged) -> Result<DatasetSummary, IngestError> {
    let path = staged.file.to_path_buf();
    let summary = tokio::task::spawn_blocking(move || engine::dataset::summarize_file(&path))
        .await
        .map_err(|e| IngestError::Interrupted(e.to_string()))??;
    Ok(summary)
}

/// Where and as what a staged upload is stored.
pub struct Target<'a> {
    pub kind: UploadKind,
    pub project: &'a str,
    pub name: &'a str,
    pub format: &'a str,
}

/// Stores a staged upload as a model or dataset: object first, then row; the object is removed if the row fails.
pub async fn commit<S: serde::Serialize + Clone>(
    db: &Db,
    blobs: &dyn BlobStore,
    target: Target<'_>,
    staged: Staged,
    summary: S,
) -> Result<Upload<S>, IngestError> {
    let Target {
        kind,
        project,
        name,
        format,
    } = target;
    let id = match kind {
        UploadKind::Model => crate::domain::ids::ModelId::new().to_string(),
        UploadKind::Dataset => crate::domain::ids::DatasetId::new().to_string(),
    };
    let key = upload_key(
        project,
        if kind == UploadKind::Model {
            "models"
        } else {
            "datasets"
        },
        &id,
    );
    // A quick refusal before the upload is copied; the insert below checks again, exactly.
    let max_stored_bytes = check_stored_bytes(db, project, staged.size).await?;
    blobs.put_file(&key, &staged.file).await?;
    let upload = Upload {
        id,
        project: project.to_string(),
        name: name.to_string(),
        format: format.to_string(),
        size_bytes: staged.size as i64,
        sha256: staged.sha256.clone(),
        blob_key: key.clone(),
        summary,
        created_at: chrono::Utc::now(),
    };
    if let Err(e) = db.insert_upload(kind, &upload, max_stored_bytes).await {
        let _ = blobs.delete(&key).await;
        return Err(match e {
            StoreError::OverQuota { limit, detail } => IngestError::OverQuota { limit, detail },
            other => other.into(),
        });
    }
    Ok(upload)
}

/// Refuses an upload that would take the project over its `max_stored_bytes`; the quota.
async fn check_stored_bytes(db: &Db, project: &str, size: u64) -> Result<Option<i64>, IngestError> {
    let Some(max) = db.project_quotas(project).await?.max_stored_bytes else {
        return Ok(None);
    };
    let used = db.project_usage(project).await?.stored_bytes;
    if used.saturating_add(size as i64) > max {
        return Err(IngestError::OverQuota {
            limit: "max_stored_bytes",
            detail: format!(
                "project `{project}` stores {used} of its {max} bytes (max_stored_bytes); this {size}-byte upload does not fit, so nothing was stored"
            ),
        });
    }
    Ok(Some(max))
}
