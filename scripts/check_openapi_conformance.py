"""Runs schemathesis against a live Shrink with the committed OpenAPI document.

Fails on any server error, any response that breaks the document (status code, content type,
headers, body schema), any request the document forbids that the API accepts, and any request
the document allows that the API refuses as invalid (except where scripts/schemathesis.toml says
why the schema cannot tell). With --model and --dataset it first seeds a model, a dataset and a
finished job and runs a pass over the operations on each, so that reports, logs and artifacts are
checked too, then runs the whole document.
Prints `conformance: ok` when the run is clean. Used by the test suite (tests/api/binary.rs).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent

def call(url: str, key: str, method: str = "GET", body: bytes | None = None, ctype: str | None = None):
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if ctype:
        req.add_header("Content-Type", ctype)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def seed(url: str, key: str, model: str, dataset: str) -> dict:
    """A model, a dataset and a finished job, so operations on ids reach real resources (their
    reports, logs and artifacts) instead of only 404s."""
    m = call(f"{url}/models?name=model.onnx", key, "POST", pathlib.Path(model).read_bytes(), "application/octet-stream")
    d = call(f"{url}/datasets?name=data.npz", key, "POST", pathlib.Path(dataset).read_bytes(), "application/octet-stream")
    spec = {"model_id": m["id"], "dataset_id": d["id"], "pipeline": [{"stage": "evaluate", "latency_runs": 3, "warmup_runs": 1}]}
    job = call(f"{url}/jobs", key, "POST", json.dumps(spec).encode(), "application/json")
    deadline = time.time() + 300
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        if time.time() > deadline:
            raise SystemExit(f"the seed job did not finish: {job}")
        time.sleep(0.2)
        job = call(f"{url}/jobs/{job['id']}", key)
    if job["status"] != "succeeded":
        raise SystemExit(f"the seed job did not succeed: {job}")
    return {"model": m["id"], "dataset": d["id"], "job": job["id"]}


def targeted(ids: dict) -> list[tuple[str, str, str]]:
    """Passes over the operations on one seeded resource: (path regex, methods, extra config).
    Deletes keep random ids, so that the resources live through the runs."""
    return [
        (r"^/models/\{id\}", "GET", f'"path.id" = "{ids["model"]}"'),
        (r"^/datasets/\{id\}", "GET", f'"path.id" = "{ids["dataset"]}"'),
        (r"^/jobs/\{id\}", "GET,POST", f'"path.id" = "{ids["job"]}"\n"path.name" = "report.json"'),
        (r"^/projects/\{id\}", "GET,POST,PUT", '"path.id" = "default"'),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--max-examples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--model", help="an ONNX model to seed the server with")
    ap.add_argument("--dataset", help="a dataset for the model")
    args = ap.parse_args()
    base = (ROOT / "scripts/schemathesis.toml").read_text()
    # The seeded resources first, before the full run's deletes and quota changes can reach them.
    passes = []
    if args.model and args.dataset:
        ids = seed(args.url, args.key, args.model, args.dataset)
        print(f"seeded: {ids}", flush=True)
        passes += targeted(ids)
    passes.append(("", "", ""))
    for regex, methods, params in passes:
        if run(args, base, regex, methods, params) != 0:
            print(f"conformance: schemathesis failed on {regex or 'every operation'}", flush=True)
            return 1
    print("conformance: ok", flush=True)
    return 0


def run(args, base: str, regex: str, methods: str, params: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp) / "schemathesis.toml"
        config.write_text(base + (f"\n[parameters]\n{params}\n" if params else ""))
        cmd = [
            str(ROOT / ".venv/bin/schemathesis"),
            "--config-file",
            str(config),
            "run",
            str(ROOT / "openapi/openapi.json"),
            "--url",
            args.url,
            "--header",
            f"Authorization: Bearer {args.key}",
            "--max-examples",
            str(args.max_examples),
            "--seed",
            str(args.seed),
            "--generation-database",
            "none",
            "--workers",
            "2",
            "--request-timeout",
            "30",
            "--no-color",
            "--report-dir",
            str(pathlib.Path(tmp) / "report"),
        ]
        if regex:
            cmd += ["--include-path-regex", regex, "--include-method-regex", "^(" + methods.replace(",", "|") + ")$"]
        return subprocess.run(cmd, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
