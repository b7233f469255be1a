//! S3-compatible object storage (AWS S3, SeaweedFS, MinIO, Ceph) through aws-sdk-s3.
use super::{BlobError, BlobStore, BlobStream, Result};
use async_trait::async_trait;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::StreamExt;
use std::path::Path;

/// Files above this size upload in parts, so a failed part is retried alone and memory stays flat.
const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
const PART_SIZE: u64 = 16 * 1024 * 1024;

pub struct S3Blobs {
    client: Client,
    bucket: String,
    /// Prepended to every key, so several deployments (or test runs) can share a bucket.
    prefix: String,
}

/// Connection settings; credentials come from the standard AWS chain (environment, profile, IMDS).
pub struct S3Config<'a> {
    pub bucket: &'a str,
    /// Key prefix inside the bucket (`team-a/`); empty for none.
    pub prefix: &'a str,
    pub endpoint: Option<&'a str>,
    pub region: &'a str,
    pub path_style: bool,
    pub create_bucket: bool,
    /// Fixed access key and secret instead of the AWS credential chain.
    pub static_credentials: Option<(&'a str, &'a str)>,
}

fn backend(e: impl std::fmt::Display) -> BlobError {
    BlobError::Backend(e.to_string())
}

fn describe_sdk<E: std::error::Error>(e: E) -> BlobError {
    // The SDK's Display says only "service error"; the source chain has the code and message.
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    BlobError::Backend(msg)
}

impl S3Blobs {
    pub async fn connect(c: S3Config<'_>) -> Result<Self> {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(c.region.to_string()))
            .load()
            .await;
        let mut conf = aws_sdk_s3::config::Builder::from(&shared).force_path_style(c.path_style);
        if let Some((key, secret)) = c.static_credentials {
            conf = conf.credentials_provider(aws_sdk_s3::config::Credentials::new(
                key,
                secret,
                None,
                None,
                "shrink-settings",
            ));
        }
        if let Some(endpoint) = c.endpoint {
            conf = conf.endpoint_url(endpoint);
        }
        let client = Client::from_conf(conf.build());
        let me = Self {
            client,
            bucket: c.bucket.to_string(),
            prefix: c.prefix.to_string(),
        };
        if c.create_bucket
            && me
                .client
                .head_bucket()
                .bucket(&me.bucket)
                .send()
                .await
                .is_err()
        {
            match me.client.create_bucket().bucket(&me.bucket).send().await {
                Ok(_) => {}
                // Processes starting together race to create it; losing that race is fine.
                Err(e)
                    if e.as_service_error().is_some_and(|s| {
                        s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()
                    }) => {}
                Err(e) => return Err(describe_sdk(e)),
            }
        }
        Ok(me)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn put_multipart(&self, key: &str, path: &Path, len: u64) -> Result<()> {
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(describe_sdk)?;
        let upload_id = upload
            .upload_id()
            .ok_or_else(|| backend("no upload id returned"))?
            .to_string();
        let result = async {
            let mut parts = Vec::new();
            let mut offset = 0u64;
            let mut number = 1i32;
            while offset < len {
                let size = PART_SIZE.min(len - offset);
                let body = ByteStream::read_from()
                    .path(path)
                    .offset(offset)
                    .length(Length::Exact(size))
                    .build()
                    .await
                    .map_err(backend)?;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(self.full_key(key))
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(body)
                    .send()
                    .await
                    .map_err(describe_sdk)?;
                parts.push(
                    CompletedPart::builder()
                        .set_e_tag(part.e_tag().map(str::to_string))
                        .part_number(number)
                        .build(),
                );
                offset += size;
                number += 1;
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(describe_sdk)?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // Leave no half-uploaded parts behind.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }
}

#[async_trait]
impl BlobStore for S3Blobs {
    async fn put_file(&self, key: &str, path: &Path) -> Result<()> {
        let len = tokio::fs::metadata(path).await?.len();
        if len > MULTIPART_THRESHOLD {
            return self.put_multipart(key, path, len).await;
        }
        let body = ByteStream::from_path(path).await.map_err(backend)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(body)
            .send()
            .await
            .map_err(describe_sdk)?;
        Ok(())
    }

    async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(describe_sdk)?;
        Ok(())
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut stream = self.get_stream(key).await?;
        let mut file = tokio::fs::File::create(path).await?;
        while let Some(chunk) = stream.body.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await?;
        Ok(())
    }

    async fn get_stream(&self, key: &str) -> Result<BlobStream> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(BlobError::NotFound(key.into()))
            }
            Err(e) => return Err(describe_sdk(e)),
        };
        let len = out.content_length().unwrap_or(0).max(0) as u64;
        let reader = out.body.into_async_read();
        Ok(BlobStream {
            len,
            body: tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024).boxed(),
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(describe_sdk)?;
        Ok(())
    }

    async fn presigned_get(&self, key: &str, ttl: std::time::Duration) -> Result<Option<String>> {
        let conf = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).map_err(backend)?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .presigned(conf)
            .await
            .map_err(describe_sdk)?;
        Ok(Some(req.uri().to_string()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full_key(prefix))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(describe_sdk)?;
            for o in page.contents() {
                if let Some(k) = o.key().and_then(|k| k.strip_prefix(self.prefix.as_str())) {
                    out.push((k.to_string(), o.size().unwrap_or(0).max(0) as u64));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn check(&self) -> Result<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(describe_sdk)?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("S3 bucket {}", self.bucket)
    }
}
