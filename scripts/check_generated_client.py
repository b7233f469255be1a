"""Generates a Python client from the committed OpenAPI document with openapi-python-client and
runs a job with it against a live Shrink: raw and multipart uploads, a JSON and a multipart job,
polling, the report, artifacts, and a 422 problem. Prints `job succeeded` at the end.

Used by the test suite (tests/api/binary.rs); run by hand as
    .venv/bin/python scripts/check_generated_client.py --url http://127.0.0.1:8080 \
        --key "$(cat shrink-data/admin.key)" --model M.onnx --dataset D.npz --work /tmp/client
"""
import argparse
import io
import json
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def generate(work: pathlib.Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    done = subprocess.run(
        [
            str(ROOT / ".venv/bin/openapi-python-client"),
            "generate",
            "--path",
            str(ROOT / "openapi/openapi.json"),
            "--meta",
            "none",
        ],
        cwd=work,
        capture_output=True,
        text=True,
    )
    out = done.stdout + done.stderr
    if done.returncode != 0 or not (work / "shrink_client").is_dir():
        raise SystemExit(f"openapi-python-client failed:\n{out}")
    # Schemas it could not turn into models would silently drop operations' bodies.
    if "Unable to" in out or "Could not" in out:
        raise SystemExit(f"openapi-python-client dropped parts of the document:\n{out}")
    sys.path.insert(0, str(work))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    generate(pathlib.Path(args.work))

    from shrink_client import AuthenticatedClient, Client
    from shrink_client.api.datasets import upload_dataset
    from shrink_client.api.jobs import create_job, get_job, job_report, list_artifacts, get_artifact
    from shrink_client.api.models import upload_model
    from shrink_client.api.projects import me
    from shrink_client.models import (
        DatasetResponse,
        FileForm,
        Job,
        JobForm,
        JobSpec,
        JobStatus,
        ModelResponse,
        Problem,
    )
    from shrink_client.types import File

    client = AuthenticatedClient(base_url=args.url, token=args.key, timeout=120)

    who = me.sync(client=client)
    assert who is not None and who.project == "default", who
    anonymous = me.sync_detailed(client=Client(base_url=args.url))
    assert anonymous.status_code == 401 and isinstance(anonymous.parsed, Problem), anonymous

    model_bytes = pathlib.Path(args.model).read_bytes()
    data_bytes = pathlib.Path(args.dataset).read_bytes()
    model = upload_model.sync(
        client=client,
        body=File(payload=io.BytesIO(model_bytes), file_name="model.onnx", mime_type="application/octet-stream"),
        name="model.onnx",
    )
    assert isinstance(model, ModelResponse), model
    dataset = upload_dataset.sync(
        client=client,
        body=FileForm(file=File(payload=io.BytesIO(data_bytes), file_name="val.npz")),
    )
    assert isinstance(dataset, DatasetResponse), dataset
    assert dataset.name == "val.npz" and dataset.samples > 0, dataset

    spec = JobSpec.from_dict(
        {
            "model_id": model.id,
            "dataset_id": dataset.id,
            "pipeline": [{"stage": "evaluate", "latency_runs": 5, "warmup_runs": 1}],
            "labels": {"client": "openapi-python-client"},
        }
    )
    job = create_job.sync(client=client, body=spec, idempotency_key="generated-client-1")
    assert isinstance(job, Job), job
    again = create_job.sync(client=client, body=spec, idempotency_key="generated-client-1")
    assert isinstance(again, Job) and again.id == job.id, again

    # The multipart form: files stand in for the ids.
    form = JobForm(
        spec=json.dumps({"pipeline": [{"stage": "evaluate", "latency_runs": 5}]}),
        model=File(payload=io.BytesIO(model_bytes), file_name="model.onnx"),
        dataset=File(payload=io.BytesIO(data_bytes), file_name="val.npz"),
    )
    multipart_job = create_job.sync(client=client, body=form)
    assert isinstance(multipart_job, Job), multipart_job

    bad = create_job.sync_detailed(
        client=client,
        body=JobSpec.from_dict({"model_id": model.id, "dataset_id": dataset.id, "pipeline": [{"stage": "evaluate", "batch_size": 0}]}),
    )
    assert bad.status_code == 422 and isinstance(bad.parsed, Problem), bad
    assert [e.pointer for e in bad.parsed.errors] == ["/pipeline/0/batch_size"], bad.parsed

    for j in (job, multipart_job):
        deadline = time.time() + 300
        while True:
            current = get_job.sync(client=client, id=j.id)
            assert isinstance(current, Job), current
            if current.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
                break
            if time.time() > deadline:
                raise SystemExit(f"job {j.id} still {current.status}")
            time.sleep(0.5)
        assert current.status == JobStatus.SUCCEEDED, current.to_dict()

    report = job_report.sync(client=client, id=job.id)
    assert report is not None and not isinstance(report, Problem), report
    task = report.final.task
    artifacts = list_artifacts.sync(client=client, id=job.id)
    names = sorted(a.name for a in artifacts)
    assert "report.json" in names, names
    raw = get_artifact.sync_detailed(client=client, id=job.id, name="report.json")
    assert raw.status_code == 200 and json.loads(raw.content)["final"], raw.status_code
    print(f"job succeeded: {job.id}, artifacts {names}, final task metrics {task.to_dict() if hasattr(task, 'to_dict') else task}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
