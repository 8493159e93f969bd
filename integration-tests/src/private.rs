//! Emulators of one test's own, on 127.0.0.1, keeping their data on disk: unlike the shared
//! ones they can be stopped and started again with their data, as a real outage would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

fn env_path(var: &str) -> anyhow::Result<PathBuf> {
    let v = std::env::var_os(var)
        .with_context(|| format!("{var} is not set: run the tests with `make test`"))?;
    Ok(PathBuf::from(v))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What a private emulator runs.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// fake-gcs-server with its filesystem backend.
    Gcs,
    /// local-bigquery with a data directory (REST on `port`, gRPC on `grpc_port`).
    BigQuery,
}

/// A private emulator; stopped when dropped.
#[derive(Debug)]
pub struct PrivateEmulator {
    kind: Kind,
    child: Option<Child>,
    port: u16,
    grpc_port: u16,
    root: PathBuf,
    project: String,
    /// While stopped, its ports stay bound (not listening: connections are refused, as by a
    /// stopped server), so that nothing else picks them meanwhile.
    reserved: Vec<tokio::net::TcpSocket>,
}

impl PrivateEmulator {
    /// A GCS emulator (`LOGFLOW_FAKE_GCS_BIN`) on a free port with an empty data directory.
    pub async fn gcs() -> anyhow::Result<PrivateEmulator> {
        Self::start(Kind::Gcs, "").await
    }

    /// A BigQuery emulator (`LOGFLOW_LOCAL_BIGQUERY_BIN`, with the DuckDB extensions under
    /// `LOGFLOW_LOCAL_BIGQUERY_HOME`) for `project`, on free ports, with an empty data directory.
    pub async fn bigquery(project: &str) -> anyhow::Result<PrivateEmulator> {
        Self::start(Kind::BigQuery, project).await
    }

    async fn start(kind: Kind, project: &str) -> anyhow::Result<PrivateEmulator> {
        let root = std::env::temp_dir().join(crate::unique("logflow-private-emulator"));
        std::fs::create_dir_all(&root)?;
        let mut e = PrivateEmulator {
            kind,
            child: None,
            port: free_port()?,
            grpc_port: free_port()?,
            root,
            project: project.to_string(),
            reserved: Vec::new(),
        };
        e.resume().await?;
        Ok(e)
    }

    /// `http://127.0.0.1:PORT` (the REST API).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` of the BigQuery emulator's gRPC API (Storage Write).
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Stops it with SIGTERM, as an orchestrator would, and waits for it to exit (the
    /// emulators' storage is not crash-safe: a SIGKILL mid-write can leave data they cannot
    /// load again, which is their limit, not an outage's).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let terminated = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if !terminated {
                c.kill().ok();
            }
            c.wait().ok();
            for port in [self.port, self.grpc_port] {
                // (SO_REUSEADDR: the stopped server's connections may linger in TIME_WAIT.)
                let socket = tokio::net::TcpSocket::new_v4().and_then(|s| {
                    s.set_reuseaddr(true)?;
                    s.bind(([127, 0, 0, 1], port).into())?;
                    Ok(s)
                });
                if let Ok(s) = socket {
                    self.reserved.push(s);
                }
            }
        }
    }

    /// Starts it (again) on the same ports and data, and waits until it answers.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.reserved.clear();
        let (mut cmd, ready) = match self.kind {
            Kind::Gcs => {
                let mut c = Command::new(env_path("LOGFLOW_FAKE_GCS_BIN")?);
                c.args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
                    .arg(self.port.to_string())
                    .args(["-backend", "filesystem", "-filesystem-root"])
                    .arg(&self.root)
                    .args(["-public-host", &format!("127.0.0.1:{}", self.port)])
                    .args(["-log-level", "warn"]);
                (c, format!("{}/storage/v1/b", self.endpoint()))
            }
            Kind::BigQuery => {
                let mut c = Command::new(env_path("LOGFLOW_LOCAL_BIGQUERY_BIN")?);
                c.env("HOME", env_path("LOGFLOW_LOCAL_BIGQUERY_HOME")?)
                    // As scripts/emulators.sh starts it: protobuf's C extension has crashed
                    // this emulator.
                    .env("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
                    .args(["serve", "--host", "127.0.0.1", "--port"])
                    .arg(self.port.to_string())
                    .arg("--grpc-port")
                    .arg(self.grpc_port.to_string())
                    .args(["--project", &self.project, "--data-dir"])
                    .arg(&self.root);
                let url = format!(
                    "{}/bigquery/v2/projects/{}/datasets",
                    self.endpoint(),
                    self.project
                );
                (c, url)
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the private {:?} emulator", self.kind))?;
        self.child = Some(child);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(&ready).send().await
                && r.status().is_success()
            {
                // Ours that answered, not another server on the port.
                if let Some(c) = self.child.as_mut()
                    && let Some(status) = c.try_wait()?
                {
                    bail!("the private {:?} emulator exited: {status}", self.kind);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the private {:?} emulator did not answer within 60 s",
                    self.kind
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateEmulator {
    fn drop(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.root).ok();
    }
}
