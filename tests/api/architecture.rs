//! The layers keep to their rooms: the engine, the domain and the pipeline import no web,
//! database or storage crate; the worker holds no stage logic; the API reaches the engine only
//! through the pipeline; and no two modules import each other, directly or around a circle.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

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
        "crate::pipeline",
    ];
    for dir in ["engine", "domain", "pipeline"] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        assert!(!files.is_empty());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for line in text.lines().map(str::trim) {
                for krate in forbidden.iter().filter(|k| !k.ends_with(dir)) {
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

/// Lines of Rust source under `dir` (comments left out), by file.
fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let path = root.join(dir);
    if path.is_dir() {
        rust_files(&path, &mut files);
    } else {
        files.push(root.join(format!("{dir}.rs")));
    }
    files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            let code: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            (f, code.join("\n"))
        })
        .collect()
}

#[test]
fn the_worker_runs_no_stage_logic_and_the_api_reaches_the_engine_only_through_the_pipeline() {
    for (dir, forbidden) in [
        // The worker fetches inputs, runs the pipeline and stores outputs.
        (
            "worker",
            &[
                "engine::quantize",
                "engine::prune",
                "engine::train",
                "engine::evaluate",
                "engine::channels",
                "domain::quantize",
                "domain::prune",
                "domain::distill",
            ][..],
        ),
        ("http", &["crate::engine"][..]),
        // `shrink quantize` runs the pipeline's stage, not the worker's.
        ("cli", &["crate::worker"][..]),
        ("engine", &["crate::pipeline"][..]),
        // The shared vocabulary stands below the engine.
        ("domain", &["crate::engine"][..]),
    ] {
        for (file, code) in sources(dir) {
            for f in forbidden {
                assert!(!code.contains(f), "{} uses {f}", file.display());
            }
        }
    }
}

/// A module's path from `src/` (`engine/prune/heads.rs` -> engine, prune, heads).
fn module_of(file: &Path) -> Vec<String> {
    let rel = file
        .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
        .unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Every module path a file names: `crate::a::b`, `super::c`, and each item of a `{...}` group.
fn references(module: &[String], code: &str) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut i = 0;
    let bytes: Vec<char> = code.chars().collect();
    while i < bytes.len() {
        let rest: String = bytes[i..bytes.len().min(i + 7)].iter().collect();
        let starts_path = (rest.starts_with("crate::") || rest.starts_with("super::"))
            && (i == 0 || !ident(bytes[i - 1]));
        if !starts_path {
            i += 1;
            continue;
        }
        // Read `seg::seg::...` and, at a `{`, the first path of each item.
        let mut base: Vec<String> = Vec::new();
        let mut seg = String::new();
        let mut j = i;
        loop {
            match bytes.get(j) {
                Some(&c) if ident(c) => seg.push(c),
                Some(':') if bytes.get(j + 1) == Some(&':') => {
                    base.push(std::mem::take(&mut seg));
                    j += 1;
                }
                Some('{') => {
                    let mut depth = 0;
                    let mut item = String::new();
                    let mut items = Vec::new();
                    for &c in &bytes[j..] {
                        match c {
                            '{' => depth += 1,
                            '}' => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            ',' if depth == 1 => items.push(std::mem::take(&mut item)),
                            _ if depth == 1 => item.push(c),
                            _ => {}
                        }
                    }
                    items.push(item);
                    for it in items {
                        let head: Vec<String> = it
                            .trim()
                            .split("::")
                            .map(|s| s.trim().to_string())
                            .take_while(|s| !s.is_empty() && s.chars().all(ident))
                            .collect();
                        let mut p = base.clone();
                        p.extend(head);
                        out.push(p);
                    }
                    base.clear();
                    break;
                }
                _ => {
                    if !seg.is_empty() {
                        base.push(std::mem::take(&mut seg));
                    }
                    break;
                }
            }
            j += 1;
        }
        if !base.is_empty() {
            out.push(base);
        }
        i = j.max(i + 1);
    }
    // Make every path absolute: `crate::` from the root, each `super::` one module up.
    out.into_iter()
        .filter_map(|p| {
            let mut segs = p.into_iter().peekable();
            let mut abs: Vec<String> = module.to_vec();
            match segs.peek().map(String::as_str) {
                Some("crate") => {
                    abs.clear();
                    segs.next();
                }
                Some("super") => {
                    while segs.peek().map(String::as_str) == Some("super") {
                        segs.next();
                        abs.pop()?;
                    }
                }
                _ => return None,
            }
            abs.extend(segs);
            Some(abs)
        })
        .collect()
}

#[test]
fn no_two_modules_import_each_other_directly_or_around_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(f)).collect();
    // Edges between modules where neither contains the other, lifted to the children of their
    // closest common ancestor (a child using its parent's items is how Rust modules work).
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let from = module_of(f);
        let text = std::fs::read_to_string(f).unwrap();
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        // Unit tests are compiled only for tests and may use anything.
        let code = code.split("#[cfg(test)]").next().unwrap();
        for to in references(&from, code) {
            // The longest prefix that is a module.
            let to: Vec<String> = (0..=to.len())
                .rev()
                .map(|n| to[..n].to_vec())
                .find(|p| modules.contains(p))
                .unwrap_or_default();
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue;
            }
            edges
                .entry(from[..=common].to_vec())
                .or_default()
                .insert(to[..=common].to_vec());
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        path: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) {
        if done.contains(n) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == n) {
            let cycle: Vec<String> = path[at..].iter().map(|m| m.join("::")).collect();
            panic!("import cycle: {} -> {}", cycle.join(" -> "), n.join("::"));
        }
        path.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            visit(m, edges, path, done);
        }
        path.pop();
        done.insert(n.clone());
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        visit(n, &edges, &mut Vec::new(), &mut done);
    }
    assert!(
        edges.contains_key(&vec!["pipeline".to_string()]),
        "the scan found the pipeline's imports: {edges:?}"
    );
}

#[test]
fn the_repository_tracks_no_profiler_dumps_or_large_outputs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Ok(out) = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root)
        .output()
    else {
        return; // Not a git checkout (a source tarball): nothing is tracked.
    };
    let listing = String::from_utf8_lossy(&out.stdout);
    for file in listing.split('\0').filter(|f| !f.is_empty()) {
        assert!(
            !file.contains("onnxruntime_profile_"),
            "{file}: ONNX Runtime profiler dumps are ignored, not committed"
        );
        let size = std::fs::metadata(root.join(file)).map_or(0, |m| m.len());
        assert!(
            size <= 2 * 1024 * 1024,
            "{file} is {size} bytes: outputs and data belong in .gitignore"
        );
    }
    let ignore = std::fs::read_to_string(root.join(".gitignore")).unwrap();
    assert!(ignore.contains("onnxruntime_profile_"), "{ignore}");
}
