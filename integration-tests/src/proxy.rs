//! A fault-injecting TCP proxy on 127.0.0.1, put between the worker and an emulator.
//!
//! Faults are decided per connection, when it opens: pass the bytes through, answer the first
//! request with an HTTP error status, reset the connection, or hold it open without answering.
//! Changing the fault closes every open connection, so pooled keep-alive connections cannot
//! dodge it. A rate lets a share of connections fail while the rest pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes pass through to the target.
    Pass,
    /// The first request is answered with this HTTP status and the connection closed.
    Status(u16),
    /// The connection is closed at once, before any answer.
    Reset,
    /// The connection is held open and never answered.
    Hang,
}

#[derive(Debug, Clone, Copy)]
struct Mode {
    fault: Fault,
    /// Share of new connections that get `fault`, in thousandths; the rest pass.
    per_mille: u32,
    /// Bumped on every change, to close open connections.
    epoch: u64,
}

/// Counts of what the proxy did, per connection.
#[derive(Debug, Default)]
pub struct ProxyCounts {
    /// Connections passed through.
    pub passed: AtomicU64,
    /// Connections given a fault.
    pub faulted: AtomicU64,
}

/// A running proxy; it stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: std::net::SocketAddr,
    mode: watch::Sender<Mode>,
    /// What it did.
    pub counts: Arc<ProxyCounts>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy to `target` (`http://127.0.0.1:PORT` or `127.0.0.1:PORT`), passing all.
    pub async fn start(target: &str) -> anyhow::Result<FaultProxy> {
        let target = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode {
            fault: Fault::Pass,
            per_mille: 0,
            epoch: 0,
        });
        let counts = Arc::new(ProxyCounts::default());
        let c = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((conn, _)) = listener.accept().await {
                n += 1;
                let m = *rx.borrow();
                // A fixed pattern, not randomness: the share is exact over every 1,000.
                let faulty = m.fault != Fault::Pass && (n * 397 % 1000) < u64::from(m.per_mille);
                let counter = if faulty { &c.faulted } else { &c.passed };
                counter.fetch_add(1, Ordering::Relaxed);
                let fault = if faulty { m.fault } else { Fault::Pass };
                tokio::spawn(serve(conn, fault, target.clone(), rx.clone(), m.epoch));
            }
        });
        Ok(FaultProxy {
            addr,
            mode,
            counts,
            task,
        })
    }

    /// The endpoint to give the worker instead of the target's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every new connection gets `fault` (open ones are closed).
    pub fn set(&self, fault: Fault) {
        self.set_rate(fault, 1000);
    }

    /// `per_mille` thousandths of new connections get `fault`, the others pass (open ones are
    /// closed).
    pub fn set_rate(&self, fault: Fault, per_mille: u32) {
        self.mode.send_modify(|m| {
            m.fault = fault;
            m.per_mille = per_mille.min(1000);
            m.epoch += 1;
        });
    }
}

async fn serve(
    mut conn: TcpStream,
    fault: Fault,
    target: String,
    mut mode: watch::Receiver<Mode>,
    epoch: u64,
) {
    let changed = async move {
        while mode.changed().await.is_ok() {
            if mode.borrow().epoch != epoch {
                return;
            }
        }
        std::future::pending::<()>().await;
    };
    let work = async {
        match fault {
            Fault::Pass => {
                if let Ok(mut up) = TcpStream::connect(&target).await {
                    tokio::io::copy_bidirectional(&mut conn, &mut up).await.ok();
                }
            }
            Fault::Reset => {
                conn.set_zero_linger().ok();
            }
            Fault::Hang => {
                let mut sink = [0u8; 4096];
                while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
            }
            Fault::Status(code) => {
                read_request_head(&mut conn).await;
                let body = format!(
                    "{{\"error\":{{\"code\":{code},\"message\":\"injected by the test proxy\",\"errors\":[{{\"reason\":\"backendError\"}}]}}}}"
                );
                let resp = format!(
                    "HTTP/1.1 {code} Injected\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(resp.as_bytes()).await.ok();
                conn.shutdown().await.ok();
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = changed => {}
    }
}

/// Reads until the end of the request head (the body, if any, is left unread: the answer
/// closes the connection anyway).
async fn read_request_head(conn: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 1 << 20 {
        match conn.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}
