-- Shrink's schema. Timestamps are Unix milliseconds (BIGINT) so the same queries run on
-- PostgreSQL and SQLite; JSON documents are TEXT for the same reason.
CREATE TABLE models (
    id          TEXT PRIMARY KEY,
    project     TEXT NOT NULL,
    name        TEXT NOT NULL,
    format      TEXT NOT NULL,
    size_bytes  BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    blob_key    TEXT NOT NULL,
    summary     TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX models_by_project ON models (project, id);

CREATE TABLE datasets (
    id          TEXT PRIMARY KEY,
    project     TEXT NOT NULL,
    name        TEXT NOT NULL,
    format      TEXT NOT NULL,
    size_bytes  BIGINT NOT NULL,
    sha256      TEXT NOT NULL,
    blob_key    TEXT NOT NULL,
    summary     TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX datasets_by_project ON datasets (project, id);

-- The jobs table is also the queue: workers claim queued rows with a lease.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    project           TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    spec              TEXT NOT NULL,
    model_id          TEXT NOT NULL,
    stage             TEXT,
    progress          REAL NOT NULL DEFAULT 0,
    attempt           BIGINT NOT NULL DEFAULT 0,
    max_attempts      BIGINT NOT NULL,
    run_at            BIGINT NOT NULL,
    locked_by         TEXT,
    lease_expires_at  BIGINT,
    cancel_requested  BIGINT NOT NULL DEFAULT 0,
    error             TEXT,
    passed            BIGINT,
    report_key        TEXT,
    idempotency_key   TEXT,
    request_sha256    TEXT,
    request_id        TEXT,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT,
    updated_at        BIGINT NOT NULL
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (project, idempotency_key);
CREATE INDEX jobs_by_project ON jobs (project, id);
CREATE INDEX jobs_queued ON jobs (run_at) WHERE status = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE status = 'running';

-- Every model and dataset a job reads, so that deleting one in use can be refused.
CREATE TABLE job_inputs (
    job_id    TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    input_id  TEXT NOT NULL,
    PRIMARY KEY (job_id, input_id)
);
CREATE INDEX job_inputs_by_input ON job_inputs (input_id);

CREATE TABLE job_artifacts (
    job_id        TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    blob_key      TEXT NOT NULL,
    size_bytes    BIGINT NOT NULL,
    sha256        TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    PRIMARY KEY (job_id, name)
);

-- One row per claim: which worker ran which attempt and how it ended.
CREATE TABLE job_runs (
    job_id       TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt      BIGINT NOT NULL,
    worker_id    TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    outcome      TEXT,
    PRIMARY KEY (job_id, attempt)
);
