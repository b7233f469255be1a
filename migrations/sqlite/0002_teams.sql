-- Teams: projects with quotas (NULL = unlimited) and API keys stored only as SHA-256 hashes.
CREATE TABLE projects (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    max_stored_bytes  BIGINT,
    max_queued_jobs   BIGINT,
    max_running_jobs  BIGINT,
    max_upload_bytes  BIGINT,
    created_at        BIGINT NOT NULL
);
-- Rows created before projects existed all belong to `default`, as does the first admin key.
INSERT INTO projects (id, name, created_at) VALUES ('default', 'default', 0);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    project       TEXT NOT NULL REFERENCES projects (id),
    name          TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'member', 'viewer')),
    prefix        TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT,
    revoked_at    BIGINT
);
CREATE INDEX api_keys_by_project ON api_keys (project, id);
CREATE INDEX jobs_by_project_status ON jobs (project, status);
