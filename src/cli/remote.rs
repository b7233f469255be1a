//! Talking to a running Shrink: which key the CLI sends, the HTTP client (bearer key, retries), and `shrink whoami`.
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct RemoteArgs {
    /// The Shrink server.
    #[arg(long, env = "SHRINK_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The API key; else `<data-dir>/admin.key` when the server is on this machine.
    #[arg(long, env = "SHRINK_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Where a local server keeps `admin.key`.
    #[arg(long, env = "SHRINK_DATA_DIR", default_value = "shrink-data")]
    pub data_dir: PathBuf,
}

fn is_local(server: &str) -> bool {
    let rest = server
        .strip_prefix("http://")
        .or_else(|| server.strip_prefix("https://"))
        .unwrap_or(server);
    let host = rest.split(['/', ':']).next().unwrap_or("");
    matches!(host, "127.0.0.1" | "localhost" | "0.0.0.0") || rest.starts_with("[::1]")
}

/// The key to send: `--api-key`/`SHRINK_API_KEY`, else a local server's `<data-dir>/admin.key`.
pub fn api_key(args: &RemoteArgs) -> anyhow::Result<String> {
    if let Some(k) = args
        .api_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        return Ok(k.to_string());
    }
    let file = crate::app::admin_key_path(&args.data_dir);
    if is_local(&args.server) {
        if let Some(k) = read_key(&file)? {
            return Ok(k);
        }
        bail!(
            "no API key: set SHRINK_API_KEY (or --api-key), or run this where the local server's {} is readable",
            file.display()
        );
    }
    bail!(
        "no API key for {}: set SHRINK_API_KEY (or --api-key); {} is only used for a server on this machine",
        args.server,
        file.display()
    )
}

fn read_key(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string()).filter(|k| !k.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("while reading {}", path.display())),
    }
}

/// `shrink whoami`: the project and role of the key the CLI would send.
pub fn whoami(args: RemoteArgs) -> anyhow::Result<ExitCode> {
    let key = api_key(&args)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = format!("{}/me", args.server.trim_end_matches('/'));
        let r = reqwest::Client::new()
            .get(&url)
            .bearer_auth(&key)
            .send()
            .await
            .with_context(|| format!("while calling {url}"))?;
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "{url} answered {status}: {}",
                body["detail"].as_str().unwrap_or("(no detail)")
            );
        }
        println!(
            "project {} · role {} · key {}",
            body["project"].as_str().unwrap_or("?"),
            body["role"].as_str().unwrap_or("?"),
            body["key_id"].as_str().unwrap_or("?")
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// A small HTTP client for the API: bearer key, retries on connection errors and 5xx.
pub struct Api {
    pub(super) base: String,
    pub(super) key: String,
    pub(super) http: reqwest::Client,
}

impl Api {
    pub fn new(remote: &RemoteArgs) -> anyhow::Result<Api> {
        Ok(Api {
            base: remote.server.trim_end_matches('/').to_string(),
            key: api_key(remote)?,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    /// Sends what `build` makes, retrying connection errors and 5xx (1, 2, 4, 8 s); a 4xx is an error
    /// with the problem's detail.
    pub(super) async fn send(
        &self,
        what: &str,
        build: impl Fn(&reqwest::Client) -> anyhow::Result<reqwest::RequestBuilder>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut delay = Duration::from_secs(1);
        for attempt in 1..=5 {
            let result = build(&self.http)?.bearer_auth(&self.key).send().await;
            match result {
                Ok(r) if r.status().is_server_error() && attempt < 5 => {
                    eprintln!(
                        "{what}: the server answered {}; retrying in {delay:?}",
                        r.status()
                    );
                }
                Ok(r) if r.status().is_client_error() || r.status().is_server_error() => {
                    let status = r.status();
                    let body: Value = r.json().await.unwrap_or_default();
                    let mut detail = body["detail"].as_str().unwrap_or("").to_string();
                    for e in body["errors"].as_array().into_iter().flatten() {
                        detail.push_str(&format!(
                            "\n  {}: {}",
                            e["pointer"].as_str().unwrap_or(""),
                            e["detail"].as_str().unwrap_or("")
                        ));
                    }
                    bail!("{what}: the server answered {status}: {detail}");
                }
                Ok(r) => return Ok(r),
                Err(e) if attempt < 5 => {
                    eprintln!("{what}: {e}; retrying in {delay:?}");
                }
                Err(e) => return Err(e).with_context(|| format!("{what} at {}", self.base)),
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        bail!("{what}: gave up after 5 attempts")
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let r = self
            .send(&format!("GET {path}"), |c| Ok(c.get(&url)))
            .await?;
        Ok(r.json().await?)
    }

    pub async fn post_empty(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let r = self
            .send(&format!("POST {path}"), |c| Ok(c.post(&url)))
            .await?;
        Ok(r.json().await?)
    }

    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<::bytes::Bytes> {
        let url = format!("{}{path}", self.base);
        let r = self
            .send(&format!("GET {path}"), |c| Ok(c.get(&url)))
            .await?;
        Ok(r.bytes().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_servers_read_the_admin_key_file() {
        assert!(is_local("http://127.0.0.1:8080"));
        assert!(is_local("http://localhost:9000/"));
        assert!(!is_local("https://shrink.internal"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.key"), "shrk_abc\n").unwrap();
        let mut args = RemoteArgs {
            server: "http://127.0.0.1:8080".into(),
            api_key: None,
            data_dir: dir.path().to_path_buf(),
        };
        assert_eq!(api_key(&args).unwrap(), "shrk_abc");
        args.api_key = Some("shrk_env".into());
        assert_eq!(api_key(&args).unwrap(), "shrk_env");
        args.api_key = None;
        args.server = "https://shrink.internal".into();
        assert!(api_key(&args)
            .unwrap_err()
            .to_string()
            .contains("SHRINK_API_KEY"));
    }
}
