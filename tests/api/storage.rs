//! The object stores themselves, against a real S3-compatible server and a local directory.
use crate::helpers::{s3_endpoint, spawn_with, test_settings, Setup};
use shrink::blob::s3::S3Config;
use shrink::blob::{BlobError, BlobStore, LocalBlobs, S3Blobs};
use std::io::Write;

/// Settings for a test bucket on the test server, with the chain's credentials.
fn config<'a>(bucket: &'a str, endpoint: &'a str) -> S3Config<'a> {
    S3Config {
        bucket,
        prefix: "",
        endpoint: Some(endpoint),
        region: "us-east-1",
        path_style: true,
        create_bucket: true,
        static_credentials: None,
    }
}

async fn s3() -> S3Blobs {
    std::env::set_var(
        "AWS_ACCESS_KEY_ID",
        std::env::var("SHRINK_TEST_S3_KEY").unwrap_or_else(|_| "testkey".into()),
    );
    std::env::set_var(
        "AWS_SECRET_ACCESS_KEY",
        std::env::var("SHRINK_TEST_S3_SECRET").unwrap_or_else(|_| "testsecret".into()),
    );
    let prefix = format!("{}/", uuid::Uuid::new_v4().simple());
    let endpoint = s3_endpoint();
    S3Blobs::connect(S3Config {
        prefix: &prefix,
        ..config(crate::helpers::TEST_BUCKET, &endpoint)
    })
    .await
    .expect("an S3-compatible server must run (scripts/test starts SeaweedFS)")
}

fn big_file(mib: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    for i in 0..mib {
        f.write_all(&vec![(i % 251) as u8; 1024 * 1024]).unwrap();
    }
    f
}

async fn round_trip(store: &dyn BlobStore) {
    let src = big_file(20); // over the multipart threshold
    let expected = std::fs::read(src.path()).unwrap();
    store.put_file("p/models/big", src.path()).await.unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    store.get_to_file("p/models/big", out.path()).await.unwrap();
    assert!(
        std::fs::read(out.path()).unwrap() == expected,
        "{}: bytes differ after a round trip",
        store.describe()
    );
    let stream = store.get_stream("p/models/big").await.unwrap();
    assert_eq!(stream.len, expected.len() as u64);
    store.delete("p/models/big").await.unwrap();
    assert!(matches!(
        store.get_stream("p/models/big").await,
        Err(BlobError::NotFound(_))
    ));
    store.check().await.unwrap();
}

#[tokio::test]
async fn s3_stores_large_objects_in_parts_and_reads_them_back() {
    round_trip(&s3().await).await;
}

#[tokio::test]
async fn processes_starting_together_may_all_create_the_same_bucket() {
    s3().await; // sets the test credentials
    let bucket = format!("shrink-race-{}", uuid::Uuid::new_v4().simple());
    let endpoint = s3_endpoint();
    let connect = || S3Blobs::connect(config(&bucket, &endpoint));
    let (a, b, c, d) = tokio::join!(connect(), connect(), connect(), connect());
    for r in [a, b, c, d] {
        let store = r.expect("losing the race to create the bucket is not an error");
        store.check().await.unwrap();
    }
}

#[tokio::test]
async fn keys_live_under_the_configured_prefix() {
    let store = s3().await;
    store
        .put_bytes("p/prefixed", bytes::Bytes::from_static(b"here"))
        .await
        .unwrap();
    let endpoint = s3_endpoint();
    let unprefixed = S3Blobs::connect(S3Config {
        create_bucket: false,
        ..config(store.bucket(), &endpoint)
    })
    .await
    .unwrap();
    assert!(matches!(
        unprefixed.get_stream("p/prefixed").await,
        Err(BlobError::NotFound(_))
    ));
    let listing = unprefixed
        .get_stream(&format!("{}p/prefixed", store.prefix()))
        .await
        .unwrap();
    assert_eq!(listing.len, 4);
}

#[tokio::test]
async fn the_local_store_round_trips_and_refuses_escaping_keys() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobs::new(dir.path().to_path_buf()).unwrap();
    round_trip(&store).await;
    assert!(store.put_bytes("../outside", "x".into()).await.is_err());
}

#[tokio::test]
async fn s3_presigned_urls_download_the_object() {
    let store = s3().await;
    store
        .put_bytes("p/x", bytes::Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let url = store
        .presigned_get("p/x", std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let body = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(&body[..], b"hello");
}

#[tokio::test]
async fn a_wrong_s3_secret_is_refused() {
    let store = s3().await;
    store
        .put_bytes("p/y", bytes::Bytes::from_static(b"x"))
        .await
        .unwrap();
    let endpoint = s3_endpoint();
    let bad = S3Blobs::connect(S3Config {
        create_bucket: false,
        static_credentials: Some(("testkey", "not-the-secret")),
        ..config(store.bucket(), &endpoint)
    })
    .await
    .unwrap();
    assert!(
        bad.check().await.is_err(),
        "the right bucket with a wrong secret must be refused"
    );
    assert!(bad.get_stream("p/y").await.is_err());
    assert!(
        bad.put_bytes("p/z", bytes::Bytes::from_static(b"x"))
            .await
            .is_err(),
        "a write with a wrong secret must fail"
    );
}

#[tokio::test]
async fn artifact_downloads_redirect_to_presigned_urls_when_configured() {
    let (mut settings, dir) = test_settings(Setup::Production).await;
    settings.s3_presign = true;
    let app = spawn_with(settings, dir, 0).await;
    let m = app.model("two_input.onnx").await;
    let r = app
        .client
        .get(app.url(&format!("/models/{}/file", m["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let body = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        body.to_vec(),
        std::fs::read(crate::helpers::fixture("two_input.onnx")).unwrap()
    );
}
