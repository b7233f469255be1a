//! `shrink submit --wait` against a live `shrink serve`: one exit status per outcome, progress on
//! stderr, downloads, a Markdown summary and JUnit XML, and one job per retried submit.
use crate::binary::Server;
use crate::helpers::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn submit(server: &Server, key: Option<&str>, args: &[&str]) -> Run {
    shrink(server, key, "submit", args)
}

fn jobs(server: &Server, args: &[&str]) -> Run {
    shrink(server, None, "jobs", args)
}

fn shrink(server: &Server, key: Option<&str>, command: &str, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shrink"));
    cmd.arg(command)
        .args(args)
        .env("SHRINK_SERVER", &server.url)
        .env("SHRINK_DATA_DIR", &server.data_dir)
        .env_remove("SHRINK_API_KEY");
    if let Some(k) = key {
        cmd.env("SHRINK_API_KEY", k);
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn a_passing_job_exits_0_with_progress_downloads_summary_and_junit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("SHRINK_WORKERS", "1")]).await;
    let out = dir.path().join("out");
    let (junit, summary) = (dir.path().join("junit.xml"), dir.path().join("summary.md"));
    let model = fixture("digits_mlp.onnx");
    let data = fixture("digits_val.npz");
    let run = submit(
        &server,
        None,
        &[
            path(&model),
            "--dataset",
            path(&data),
            "--pipeline",
            "evaluate",
            "--max-accuracy-drop",
            "0.01",
            "--label",
            "team=vision",
            "--wait",
            "--download",
            path(&out),
            "--junit",
            path(&junit),
            "--summary",
            path(&summary),
        ],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let id = run.stdout.trim();
    // Progress lines while waiting, the verdict at the end.
    assert!(run.stderr.contains("succeeded"), "{}", run.stderr);
    assert!(
        run.stderr.lines().any(|l| l.contains(" s] ")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("PASS max_accuracy_drop"),
        "{}",
        run.stderr
    );
    // The files the job produced.
    for name in ["model.onnx", "report.json", "job.log"] {
        assert!(out.join(name).is_file(), "{name} not downloaded");
    }
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["job_id"], id);
    // The summary's table carries the report's numbers.
    let md = std::fs::read_to_string(&summary).unwrap();
    let top1 = report["final"]["task"]["top1_accuracy"].as_f64().unwrap();
    assert!(
        md.contains(&format!("| top-1 accuracy | {top1:.4} | {top1:.4} |")),
        "{md}"
    );
    assert!(
        md.contains("| max_accuracy_drop |") && md.contains("| pass |"),
        "{md}"
    );
    // JUnit, read by a real XML parser: one passing case per verdict.
    let parsed = python_json(&format!(
        "import json, xml.etree.ElementTree as E; s = E.parse({:?}).getroot().find('testsuite'); \
         print(json.dumps({{'tests': s.get('tests'), 'failures': s.get('failures'), 'names': [c.get('name') for c in s]}}))",
        path(&junit)
    ));
    assert_eq!(
        parsed,
        json!({"tests": "1", "failures": "0", "names": ["max_accuracy_drop"]})
    );
    // The same job through `shrink jobs`.
    let run = jobs(&server, &["report", id]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let again: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(again, report);
    let copy = dir.path().join("copy");
    assert_eq!(jobs(&server, &["download", id, path(&copy)]).code, 0);
    assert_eq!(
        std::fs::read(copy.join("model.onnx")).unwrap(),
        std::fs::read(out.join("model.onnx")).unwrap()
    );
    let run = jobs(&server, &["logs", id]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stdout.is_empty());
    let run = jobs(&server, &["wait", id]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let labels = get_value(
        &client_with_key(Some(&server.admin_key())),
        &server.url(&format!("/jobs/{id}")),
    )
    .await;
    assert_eq!(labels["labels"]["team"], "vision");
}

fn python_json(code: &str) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join(".venv/bin/python"))
        .args(["-c", code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn exit_statuses_say_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[("SHRINK_WORKERS", "1")]).await;
    let (mlp, digits) = (fixture("digits_mlp.onnx"), fixture("digits_val.npz"));

    // 1: the job succeeded, a constraint did not hold; JUnit says which.
    let spec = dir.path().join("spec.json");
    std::fs::write(
        &spec,
        json!({"pipeline": [{"stage": "evaluate"}], "constraints": {"max_size_bytes": 1}})
            .to_string(),
    )
    .unwrap();
    let junit = dir.path().join("junit.xml");
    let run = submit(
        &server,
        None,
        &[
            path(&mlp),
            "--dataset",
            path(&digits),
            "--spec",
            path(&spec),
            "--wait",
            "--junit",
            path(&junit),
        ],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("FAIL max_size_bytes"), "{}", run.stderr);
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("failures=\"1\"") && xml.contains("<failure"),
        "{xml}"
    );

    // 2: the job failed; its reason is printed.
    let (two, two_data) = (fixture("two_input.onnx"), fixture("two_input.npz"));
    std::fs::write(
        &spec,
        json!({"pipeline": [{"stage": "prune", "method": "structured"}]}).to_string(),
    )
    .unwrap();
    let run = submit(
        &server,
        None,
        &[
            path(&two),
            "--dataset",
            path(&two_data),
            "--spec",
            path(&spec),
            "--wait",
        ],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("nothing in this model can be removed"),
        "{}",
        run.stderr
    );

    // 3: a revoked or unknown key, an invalid spec, a missing file: nothing queued.
    let run = submit(
        &server,
        Some("shrk_unknown"),
        &[path(&mlp), "--dataset", path(&digits), "--wait"],
    );
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("401") && !run.stderr.contains("shrk_unknown"),
        "{}",
        run.stderr
    );
    let run = submit(
        &server,
        None,
        &[
            path(&mlp),
            "--dataset",
            path(&digits),
            "--pipeline",
            "quantise",
        ],
    );
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("/pipeline/0/stage"), "{}", run.stderr);
    let run = submit(&server, None, &["missing.onnx", "--dataset", path(&digits)]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    // A command line clap refuses is a usage error too (clap's own status would be 2).
    let run = submit(&server, None, &[path(&mlp)]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("--dataset"), "{}", run.stderr);
    let jobs = get_value(
        &client_with_key(Some(&server.admin_key())),
        &server.url("/jobs"),
    )
    .await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 2, "{jobs}");
}

#[tokio::test]
async fn a_wait_that_times_out_exits_4_and_a_repeated_submit_makes_one_job() {
    let dir = tempfile::tempdir().unwrap();
    // No workers: the job stays queued.
    let server = Server::start(dir.path(), &[]).await;
    let (mlp, digits) = (fixture("digits_mlp.onnx"), fixture("digits_val.npz"));
    let args = [
        path(&mlp),
        "--dataset",
        path(&digits),
        "--wait",
        "--timeout",
        "2s",
    ];
    let first = submit(&server, None, &args);
    assert_eq!(first.code, 4, "{}", first.stderr);
    assert!(first.stderr.contains("still running"), "{}", first.stderr);
    // The same submit again (a CI retry): the same job, not a second one.
    let again = submit(&server, None, &args[..3]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.stdout.trim(), first.stdout.trim());
    let jobs = get_value(
        &client_with_key(Some(&server.admin_key())),
        &server.url("/jobs"),
    )
    .await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 1, "{jobs}");
}

/// A proxy to `target` that drops its first connection once the server starts answering (the
/// request went through, the client never hears back), and passes every later one through.
async fn proxy_dropping_first_answer(target: String) -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let mut server = tokio::net::TcpStream::connect(&target).await.unwrap();
            if std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let (mut client_read, client_write) = client.into_split();
                    let (server_read, mut server_write) = server.into_split();
                    let upstream = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    });
                    let mut server_read = server_read;
                    let mut byte = [0u8; 1];
                    let _ = server_read.read(&mut byte).await;
                    upstream.abort();
                    drop(client_write);
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_whose_answer_is_lost_retries_and_makes_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let proxy =
        proxy_dropping_first_answer(server.url.trim_start_matches("http://").to_string()).await;
    let (mlp, digits) = (fixture("digits_mlp.onnx"), fixture("digits_val.npz"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shrink"));
    cmd.args(["submit", path(&mlp), "--dataset", path(&digits)])
        .env("SHRINK_SERVER", &proxy)
        .env("SHRINK_API_KEY", server.admin_key());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("retrying"),
        "the first answer was not lost: {stderr}"
    );
    let listed = get_value(
        &client_with_key(Some(&server.admin_key())),
        &server.url("/jobs"),
    )
    .await;
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{listed}");
    assert_eq!(items[0]["id"], String::from_utf8_lossy(&out.stdout).trim());
}
