//! Wiring: settings -> database, object store, ONNX Runtime -> HTTP server and workers.
use crate::blob::{s3::S3Config, BlobStore, LocalBlobs, S3Blobs};
use crate::config::Settings;
use crate::engine::runtime::{self, Runtime};
use crate::http::{self, AppState};
use crate::store::Db;
use crate::worker::{self, WorkerContext};
use anyhow::Context;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Serve,
    Worker,
    Migrate,
}

/// Everything a running Shrink needs, built once at start-up.
pub struct Application {
    pub state: AppState,
    pub workers: WorkerContext,
    listener: Option<TcpListener>,
    port: u16,
    /// The listener serves only `/metrics` and `/healthz` (a worker process).
    metrics_only: bool,
}

impl Application {
    /// Connects and migrates the database, opens the object store, loads ONNX Runtime and (for
    /// `with_http`) binds the listener, so the port is known before serving starts.
    pub async fn build(settings: Settings, with_http: bool) -> anyhow::Result<Application> {
        tokio::fs::create_dir_all(&settings.data_dir)
            .await
            .with_context(|| format!("while creating {}", settings.data_dir.display()))?;
        let db = Db::connect(&settings.database_url())
            .await
            .context("while connecting to the database")?;
        db.migrate().await.context("while migrating the database")?;
        let blobs = open_blobs(&settings).await?;
        let runtime = load_runtime(&settings).await;
        match &runtime {
            Ok(rt) => {
                tracing::info!(version = %rt.version, library = %rt.library.display(), "ONNX Runtime loaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "ONNX Runtime is unavailable: jobs will fail until it is installed")
            }
        }
        let bind = if with_http {
            Some(&settings.bind)
        } else {
            settings.metrics_bind.as_ref()
        };
        let (listener, port) = match bind {
            Some(bind) => {
                let l = TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("while binding {bind}"))?;
                let port = l.local_addr()?.port();
                (Some(l), port)
            }
            None => (None, 0),
        };
        if with_http {
            bootstrap_admin_key(&db, &settings.data_dir).await?;
        }
        let metrics = Arc::new(crate::metrics::Metrics::new(with_http));
        let workers = WorkerContext {
            metrics: metrics.clone(),
            db: db.clone(),
            blobs: blobs.clone(),
            runtime: runtime.clone(),
            worker_id: settings.worker_id(),
            lease: Duration::from_secs(settings.lease_secs.max(1)),
            poll: Duration::from_millis(settings.poll_ms.max(10)),
            scratch_dir: settings.data_dir.join("work"),
            training_pass_memory: (settings.training_pass_memory_mb.max(1) as usize) << 20,
        };
        let state = AppState {
            limiter: http::auth::limiter(settings.rate_limit_per_second, settings.rate_limit_burst),
            metrics,
            db,
            blobs,
            runtime: Arc::new(runtime.map(|r| r.version.clone())),
            settings: Arc::new(settings),
        };
        Ok(Application {
            state,
            workers,
            listener,
            port,
            metrics_only: !with_http,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves HTTP (when bound) and runs `slots` workers until `shutdown` completes, then stops
    /// claiming, hands running jobs back and returns.
    pub async fn run_until(
        mut self,
        slots: usize,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let workers = if slots > 0 {
            Some(tokio::spawn(worker::run(
                self.workers.clone(),
                slots,
                stop_rx.clone(),
            )))
        } else {
            None
        };
        let deliveries = (self.listener.is_some() && !self.metrics_only).then(|| {
            let s = &self.state.settings;
            tokio::spawn(crate::webhooks::run(
                crate::webhooks::Deliverer {
                    db: self.state.db.clone(),
                    blobs: self.state.blobs.clone(),
                    metrics: self.state.metrics.clone(),
                    allow_private: s.webhook_allow_private,
                    poll: Duration::from_millis(s.webhook_poll_ms.max(10)),
                    max_attempts: s.webhook_max_attempts.max(1) as i64,
                },
                stop_rx.clone(),
            ))
        });
        let mut stop_http = stop_rx.clone();
        let server = self.listener.take().map(|listener| {
            let router = if self.metrics_only {
                http::metrics_router(self.state.clone())
            } else {
                http::router(self.state.clone())
            };
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop_http.wait_for(|s| *s).await;
                    })
                    .await
            })
        });
        shutdown.await;
        tracing::info!("shutting down: no new jobs are claimed; running jobs are handed back");
        let _ = stop_tx.send(true);
        if let Some(w) = workers {
            let _ = w.await;
        }
        if let Some(d) = deliveries {
            let _ = d.await;
        }
        if let Some(s) = server {
            s.await?.context("while serving HTTP")?;
        }
        Ok(())
    }
}

/// Where the first `serve` writes the admin key it creates.
pub fn admin_key_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("admin.key")
}

/// On a database with no API key at all, creates an admin key in the `default` project and
/// writes it to `<data-dir>/admin.key` (mode 0600), so the embedded default needs no set-up.
pub async fn bootstrap_admin_key(db: &Db, data_dir: &std::path::Path) -> anyhow::Result<()> {
    if db.count_keys().await? > 0 {
        return Ok(());
    }
    let key = db
        .create_key(
            crate::domain::team::DEFAULT_PROJECT,
            "bootstrap admin",
            crate::domain::team::Role::Admin,
            crate::store::now_ms(),
        )
        .await?;
    let path = admin_key_path(data_dir);
    if let Err(e) = write_secret(&path, &key.secret) {
        // A key nobody can read is useless: take it back so the next start tries again.
        let _ = db
            .revoke_key(
                crate::domain::team::DEFAULT_PROJECT,
                &key.key.id,
                crate::store::now_ms(),
            )
            .await;
        return Err(e)
            .with_context(|| format!("while writing the admin key to {}", path.display()));
    }
    tracing::warn!(path = %path.display(), prefix = %key.key.prefix,
        "created the first admin API key (project `default`); it is in this file, readable only by this user. \
         Use it as `Authorization: Bearer <key>`, or SHRINK_API_KEY for the CLI");
    Ok(())
}

fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn open_blobs(s: &Settings) -> anyhow::Result<Arc<dyn BlobStore>> {
    Ok(match &s.s3_bucket {
        Some(bucket) => Arc::new(
            S3Blobs::connect(S3Config {
                bucket,
                prefix: &s.s3_prefix,
                endpoint: s.s3_endpoint.as_deref(),
                region: &s.s3_region,
                path_style: s.s3_path_style,
                create_bucket: s.s3_create_bucket,
                static_credentials: None,
            })
            .await
            .context("while connecting to the S3 bucket")?,
        ),
        None => Arc::new(
            LocalBlobs::new(s.data_dir.join("blobs"))
                .context("while creating the local blob directory")?,
        ),
    })
}

/// Finds ONNX Runtime (flag, ORT_DYLIB_PATH, .venv, data dir); when absent and allowed, installs the
/// pinned wheel into the data directory with pip first.
async fn load_runtime(s: &Settings) -> Result<Arc<Runtime>, String> {
    let local = s.data_dir.join("onnxruntime");
    let mut explicit = s.ort_library.clone().or_else(|| runtime::find_in(&local));
    if explicit.is_none() && runtime::locate(None).is_none() && s.ort_auto_install {
        tracing::info!(target = %local.display(), "ONNX Runtime not found; installing onnxruntime=={} with pip", runtime::PINNED_VERSION);
        let status = tokio::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
            ])
            .arg(&local)
            .arg(format!("onnxruntime=={}", runtime::PINNED_VERSION))
            .status()
            .await;
        match status {
            Ok(st) if st.success() => explicit = runtime::find_in(&local),
            Ok(st) => tracing::warn!(%st, "pip could not install onnxruntime"),
            Err(e) => tracing::warn!(error = %e, "could not run python3 -m pip"),
        }
    }
    tokio::task::spawn_blocking(move || {
        Runtime::global(explicit.as_deref()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Runs a subcommand until SIGTERM or Ctrl-C.
pub async fn run_role(settings: Settings, role: Role) -> anyhow::Result<()> {
    tracing::info!(?settings, ?role, "starting");
    match role {
        Role::Migrate => {
            let db = Db::connect(&settings.database_url())
                .await
                .context("while connecting to the database")?;
            db.migrate().await.context("while migrating")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Role::Serve => {
            let slots = settings.workers;
            let app = Application::build(settings, true).await?;
            tracing::info!(port = app.port(), "listening");
            app.run_until(slots, shutdown_signal()).await
        }
        Role::Worker => {
            let slots = settings.workers.max(1);
            let app = Application::build(settings, false).await?;
            app.run_until(slots, shutdown_signal()).await
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
