"""Runs schemathesis against a live Shrink with the committed OpenAPI document.

Fails on any server error, any response that breaks the document (status code, content type,
headers, body schema), any request the document forbids that the API accepts, and any request
the document allows that the API refuses as invalid (except where scripts/schemathesis.toml says
why the schema cannot tell).
Prints `conformance: ok` when the run is clean. Used by the test suite (tests/api/binary.rs).
"""
import argparse
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--max-examples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=20261206)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(ROOT / ".venv/bin/schemathesis"),
            "--config-file",
            str(ROOT / "scripts/schemathesis.toml"),
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
            tmp,
        ]
        done = subprocess.run(cmd, cwd=tmp)
    if done.returncode != 0:
        print(f"conformance: schemathesis exited {done.returncode}", flush=True)
        return 1
    print("conformance: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
