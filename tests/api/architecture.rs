//! The engine and the domain stay free of web, database and storage crates.
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_engine_and_domain_import_no_web_database_or_storage_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let forbidden = [
        "axum",
        "sqlx",
        "aws_sdk_s3",
        "aws_config",
        "tower_http",
        "tower",
        "tokio",
        "utoipa_axum",
        "crate::http",
        "crate::store",
        "crate::blob",
        "crate::worker",
    ];
    for dir in ["engine", "domain"] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        assert!(!files.is_empty());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for line in text.lines().map(str::trim) {
                for krate in forbidden {
                    let uses = line.starts_with(&format!("use {krate}::"))
                        || line.starts_with(&format!("use {krate};"))
                        || line.contains(&format!(" {krate}::"));
                    assert!(!uses, "{} uses {krate}: `{line}`", f.display());
                }
            }
        }
    }
}

#[test]
fn only_the_store_knows_sqlx_and_only_the_blob_module_knows_the_aws_sdk() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for (dir, krate) in [
        ("http", "sqlx"),
        ("worker", "sqlx"),
        ("http", "aws_sdk_s3"),
        ("worker", "aws_sdk_s3"),
        ("store", "aws_sdk_s3"),
    ] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            assert!(
                !text.contains(&format!("{krate}::")),
                "{} uses {krate} directly",
                f.display()
            );
        }
    }
}
