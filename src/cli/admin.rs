//! `shrink admin`: projects, keys and quotas, offline against the database (no server needed).
//! The same store functions and checks as the HTTP API's `/projects` routes.
use crate::config::Settings;
use crate::domain::team::{check_name, check_project_id, Quotas, Role};
use crate::store::{now_ms, Db, StoreError};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use std::process::ExitCode;

#[derive(Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub command: AdminCommand,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Projects (teams).
    #[command(subcommand)]
    Project(ProjectCommand),
    /// API keys.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Args)]
pub struct QuotaArgs {
    /// Bytes of models, datasets and artifacts the project may keep.
    #[arg(long)]
    pub max_stored_bytes: Option<i64>,
    /// Jobs waiting in the queue at once.
    #[arg(long)]
    pub max_queued_jobs: Option<i64>,
    /// Jobs running at once.
    #[arg(long)]
    pub max_running_jobs: Option<i64>,
    /// The largest single upload in bytes.
    #[arg(long)]
    pub max_upload_bytes: Option<i64>,
}

impl QuotaArgs {
    fn quotas(&self) -> anyhow::Result<Quotas> {
        let q = Quotas {
            max_stored_bytes: self.max_stored_bytes,
            max_queued_jobs: self.max_queued_jobs,
            max_running_jobs: self.max_running_jobs,
            max_upload_bytes: self.max_upload_bytes,
        };
        for (flag, v) in [
            ("--max-stored-bytes", q.max_stored_bytes),
            ("--max-queued-jobs", q.max_queued_jobs),
            ("--max-running-jobs", q.max_running_jobs),
            ("--max-upload-bytes", q.max_upload_bytes),
        ] {
            if v.is_some_and(|v| v < 0) {
                bail!("{flag} must be 0 or more");
            }
        }
        Ok(q)
    }
}

#[derive(Subcommand)]
pub enum ProjectCommand {
    /// Create a project; prints it as JSON.
    Create {
        /// Lowercase letters, digits and `-`.
        id: String,
        /// Display name (default: the id).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// List projects with quotas and usage, as JSON.
    List,
    /// Replace a project's quotas (a limit left out is unlimited); prints the project.
    Quotas {
        id: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a key. Prints the secret alone on standard output (shown once), details on standard error.
    Create {
        #[arg(long)]
        project: String,
        /// admin | member | viewer.
        #[arg(long)]
        role: String,
        /// What the key is for.
        #[arg(long)]
        name: String,
    },
    /// List a project's keys (never their secrets), as JSON.
    List {
        #[arg(long)]
        project: String,
    },
    /// Revoke a key: from now on it gets 401.
    Revoke {
        #[arg(long)]
        project: String,
        key_id: String,
    },
}

pub fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    crate::telemetry::init(args.settings.log_format);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("while starting the async runtime")?;
    rt.block_on(run_async(args))
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn described(e: StoreError, what: &str) -> anyhow::Error {
    match e {
        StoreError::NotFound => anyhow::anyhow!("{what} does not exist"),
        other => other.into(),
    }
}

async fn run_async(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let db = Db::connect(&args.settings.database_url())
        .await
        .context("while connecting to the database")?;
    db.migrate().await.context("while migrating the database")?;
    match args.command {
        AdminCommand::Project(ProjectCommand::Create { id, name, quotas }) => {
            check_project_id(&id).map_err(anyhow::Error::msg)?;
            let name = name.unwrap_or_else(|| id.clone());
            check_name("--name", &name).map_err(anyhow::Error::msg)?;
            print_json(
                &db.create_project(&id, &name, quotas.quotas()?, now_ms())
                    .await?,
            )?;
        }
        AdminCommand::Project(ProjectCommand::List) => print_json(&db.list_projects().await?)?,
        AdminCommand::Project(ProjectCommand::Quotas { id, quotas }) => print_json(
            &db.set_quotas(&id, quotas.quotas()?)
                .await
                .map_err(|e| described(e, &format!("project `{id}`")))?,
        )?,
        AdminCommand::Key(KeyCommand::Create {
            project,
            role,
            name,
        }) => {
            let role = Role::parse(&role)
                .with_context(|| format!("--role must be admin, member or viewer, not `{role}`"))?;
            check_name("--name", &name).map_err(anyhow::Error::msg)?;
            let key = db
                .create_key(&project, &name, role, now_ms())
                .await
                .map_err(|e| described(e, &format!("project `{project}`")))?;
            eprintln!("{}", serde_json::to_string_pretty(&key.key)?);
            println!("{}", key.secret);
        }
        AdminCommand::Key(KeyCommand::List { project }) => print_json(
            &db.list_keys(&project)
                .await
                .map_err(|e| described(e, &format!("project `{project}`")))?,
        )?,
        AdminCommand::Key(KeyCommand::Revoke { project, key_id }) => print_json(
            &db.revoke_key(&project, &key_id, now_ms())
                .await
                .map_err(|e| described(e, &format!("key `{key_id}` of project `{project}`")))?,
        )?,
    }
    Ok(ExitCode::SUCCESS)
}
