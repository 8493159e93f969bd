//! A fake-gcs-server of one test's own, on 127.0.0.1, storing objects on disk: unlike the
//! shared emulator it can be stopped and started again with its data, as a real outage would.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The emulator binary: `LOGFLOW_FAKE_GCS_BIN` (set by `scripts/emulators.sh env`).
fn binary() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("LOGFLOW_FAKE_GCS_BIN")
        .context("LOGFLOW_FAKE_GCS_BIN is not set: run the tests with `make test`")?;
    Ok(PathBuf::from(bin))
}

/// A private GCS emulator; killed when dropped.
#[derive(Debug)]
pub struct PrivateGcs {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
}

impl PrivateGcs {
    /// Starts one on a free port with an empty data directory.
    pub async fn start() -> anyhow::Result<PrivateGcs> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let root = std::env::temp_dir().join(crate::unique("logflow-private-gcs"));
        std::fs::create_dir_all(&root)?;
        let mut gcs = PrivateGcs {
            child: None,
            port,
            root,
        };
        gcs.resume().await?;
        Ok(gcs)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it with SIGTERM, as an orchestrator would, and waits for it to exit (its
    /// filesystem backend is not crash-safe: a SIGKILL mid-write can leave a bucket it cannot
    /// load again, which is the emulator's limit, not an outage's).
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
        }
    }

    /// Starts it again on the same port and data, and waits until it answers.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let child = Command::new(binary()?)
            .args(["-scheme", "http", "-host", "127.0.0.1", "-port"])
            .arg(self.port.to_string())
            .args(["-backend", "filesystem", "-filesystem-root"])
            .arg(&self.root)
            .args(["-public-host", &format!("127.0.0.1:{}", self.port)])
            .args(["-log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting fake-gcs-server")?;
        self.child = Some(child);
        let url = format!("{}/storage/v1/b", self.endpoint());
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the private GCS emulator did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateGcs {
    fn drop(&mut self) {
        self.stop();
        std::fs::remove_dir_all(&self.root).ok();
    }
}
