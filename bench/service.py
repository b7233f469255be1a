"""A Shrink service for benchmarks: `shrink serve` on the embedded defaults (SQLite, a local
directory) in a temporary folder, called over HTTP with the admin key it writes on first start."""
import json
import os
import socket
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/shrink-target"))


def shrink_binary(argv):
    """The binary named on the command line, else the release build, else the debug build."""
    return argv[1] if len(argv) > 1 else next(
        p for p in [f"{TARGET}/release/shrink", f"{TARGET}/debug/shrink"] if os.path.exists(p))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Service:
    def __init__(self, shrink, work):
        self.url = f"http://127.0.0.1:{free_port()}"
        data = os.path.join(work, "data")
        env = dict(os.environ, SHRINK_BIND=self.url[7:], SHRINK_DATA_DIR=data,
                   SHRINK_LOG="warn", SHRINK_POLL_MS="100", SHRINK_RATE_LIMIT_PER_SECOND="0")
        self.proc = subprocess.Popen([shrink, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url + "/healthz")
                self.key = open(os.path.join(data, "admin.key")).read().strip()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the service did not start")

    def call(self, method, path, body=None, ctype="application/json"):
        headers = {"content-type": ctype, "authorization": f"Bearer {self.key}"}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        with urllib.request.urlopen(req) as r:
            data = r.read()
        return json.loads(data) if r.headers.get("content-type", "").startswith("application/json") else data

    def upload(self, kind, path):
        with open(path, "rb") as f:
            return self.call("POST", f"/{kind}", f.read(), "application/octet-stream")["id"]

    def job(self, spec):
        job = self.call("POST", "/jobs", json.dumps(spec).encode())
        while True:
            st = self.call("GET", f"/jobs/{job['id']}")
            if st["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        if st["status"] != "succeeded":
            raise RuntimeError(json.dumps(st))
        return job["id"], self.call("GET", f"/jobs/{job['id']}/report")

    def artifact(self, job, name, into):
        path = os.path.join(into, f"{job}-{name}")
        with open(path, "wb") as f:
            f.write(self.call("GET", f"/jobs/{job}/artifacts/{name}"))
        return path

    def close(self):
        self.proc.terminate()
        self.proc.wait()
