//! The worker's admin endpoint: `/healthz` (liveness: every pipeline makes progress),
//! `/readyz` (readiness: false from the first shutdown signal on, after 3 StreamingPull
//! failures in a row, and while a sink's batches fail after their retries) and `/metrics`
//! (Prometheus text format, per pipeline).
//!
//! A deliberately small HTTP/1.1 responder: probes and scrapers send one GET per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use logflow_core::Stats;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Longest request head read; anything longer is answered 400.
const MAX_REQUEST: usize = 8192;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint reports.
#[derive(Debug)]
pub struct AdminState {
    /// Counters per pipeline, by name.
    pub pipelines: Vec<(String, Arc<Stats>)>,
    /// False once shutdown began.
    pub ready: AtomicBool,
    /// Progress of each pipeline, for liveness.
    pub liveness: Liveness,
}

/// Liveness from progress (a heartbeat the pipelines give by deciding messages): a pipeline
/// that holds messages but has acked or nacked none for its stall limit is stuck, and a
/// restart (the held messages are redelivered) is the cure. An idle pipeline is alive.
#[derive(Debug)]
pub struct Liveness {
    stall_after: Vec<Duration>,
    /// Per pipeline: messages decided when last seen, and since when that count stands.
    last: std::sync::Mutex<Vec<(u64, std::time::Instant)>>,
}

impl Liveness {
    /// One stall limit per pipeline, in the order of [`AdminState::pipelines`]. The pipeline's
    /// `max_lease` is a good one: past it, held messages are being redelivered anyway.
    pub fn new(stall_after: Vec<Duration>) -> Self {
        let now = std::time::Instant::now();
        Liveness {
            last: std::sync::Mutex::new(vec![(0, now); stall_after.len()]),
            stall_after,
        }
    }

    /// `Err` naming the first stuck pipeline, as seen at `now`.
    pub fn check(
        &self,
        pipelines: &[(String, Arc<Stats>)],
        now: std::time::Instant,
    ) -> Result<(), String> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, (name, stats)) in pipelines.iter().enumerate() {
            let (Some(limit), Some(seen)) = (self.stall_after.get(i), last.get_mut(i)) else {
                continue;
            };
            let s = stats.snapshot();
            let decided = s.acked + s.nacked;
            if s.outstanding == 0 || decided != seen.0 {
                *seen = (decided, now);
            } else if now.duration_since(seen.1) > *limit {
                return Err(format!(
                    "pipeline {name}: holding {} messages, none acked or nacked for {:?}",
                    s.outstanding,
                    now.duration_since(seen.1)
                ));
            }
        }
        Ok(())
    }
}

/// Binds the admin endpoint's address: `run` binds it before it starts pulling, so that an
/// address in use or invalid fails the start, not a worker already holding messages.
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "admin_listen {listen}: cannot bind: {e} (choose a free address, e.g. 0.0.0.0:8080)"
        )
    })
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the process exits.
pub fn serve_on(listener: TcpListener, state: Arc<AdminState>) -> anyhow::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    info!(%addr, "admin endpoint listening (/healthz, /readyz, /metrics)");
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                if let Err(e) = answer(conn, &state).await {
                    warn!(error = %e, "admin request failed");
                }
            });
        }
    });
    Ok(addr)
}

/// [`bind`], then [`serve_on`].
pub async fn serve(listen: &str, state: Arc<AdminState>) -> anyhow::Result<SocketAddr> {
    serve_on(bind(listen).await?, state)
}

async fn answer(mut conn: tokio::net::TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
        let n = match tokio::time::timeout(READ_TIMEOUT, conn.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, content_type, body) = route(path, state);
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

fn route(path: &str, state: &AdminState) -> (&'static str, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    match path {
        "/healthz" => match state
            .liveness
            .check(&state.pipelines, std::time::Instant::now())
        {
            Ok(()) => ("200 OK", text, "ok\n".into()),
            Err(why) => {
                warn!(reason = %why, "liveness check failed");
                ("503 Service Unavailable", text, format!("{why}\n"))
            }
        },
        "/readyz" => match readiness(state) {
            Ok(()) => ("200 OK", text, "ready\n".into()),
            Err(why) => ("503 Service Unavailable", text, format!("{why}\n")),
        },
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(&state.pipelines),
        ),
        _ => ("404 Not Found", text, "not found\n".into()),
    }
}

/// StreamingPull failures in a row that make a pipeline not ready (one is a blip: streams are
/// re-opened with backoff).
const STREAM_FAILURES_NOT_READY: u64 = 3;

/// Ready: not shutting down, its subscriptions can be read (no run of failed StreamingPull
/// attempts), and no pipeline has a sink failing (a batch whose write failed after its
/// retries, with no write succeeding since). A rollout of pods that cannot work stops at the
/// first one.
fn readiness(state: &AdminState) -> Result<(), String> {
    if !state.ready.load(Ordering::Relaxed) {
        return Err("shutting down".into());
    }
    for (name, stats) in &state.pipelines {
        let pulls = stats.stream_failures_in_a_row.load(Ordering::Relaxed);
        if pulls >= STREAM_FAILURES_NOT_READY {
            return Err(format!(
                "pipeline {name}: StreamingPull failed {pulls} times in a row, no message since"
            ));
        }
        let failed = stats.failed_writes_in_a_row.load(Ordering::Relaxed);
        if failed > 0 {
            return Err(format!(
                "pipeline {name}: {failed} batch writes failed after their retries, none succeeded since"
            ));
        }
    }
    Ok(())
}

/// The counters in Prometheus text format.
pub fn render_metrics(pipelines: &[(String, Arc<Stats>)]) -> String {
    let snaps: Vec<(&str, logflow_core::stats::Snapshot)> = pipelines
        .iter()
        .map(|(n, s)| (n.as_str(), s.snapshot()))
        .collect();
    type Get = fn(&logflow_core::stats::Snapshot) -> u64;
    let metrics: [(&str, &str, &str, Get); 16] = [
        (
            "logflow_source_received_messages_total",
            "counter",
            "Messages received from Pub/Sub.",
            |s| s.received,
        ),
        (
            "logflow_archive_written_messages_total",
            "counter",
            "Messages written to the raw archive.",
            |s| s.archived,
        ),
        (
            "logflow_decode_decoded_messages_total",
            "counter",
            "Payloads decoded into rows.",
            |s| s.decoded,
        ),
        (
            "logflow_bigquery_inserted_rows_total",
            "counter",
            "Rows accepted by BigQuery.",
            |s| s.inserted,
        ),
        (
            "logflow_deadletter_written_messages_total",
            "counter",
            "Messages written to the dead-letter path.",
            |s| s.dead_lettered,
        ),
        (
            "logflow_source_acked_messages_total",
            "counter",
            "Messages acked (every output durable).",
            |s| s.acked,
        ),
        (
            "logflow_source_nacked_messages_total",
            "counter",
            "Messages nacked (an output failed; redelivered).",
            |s| s.nacked,
        ),
        (
            "logflow_sink_retries_total",
            "counter",
            "Transient write failures that were retried.",
            |s| s.retries,
        ),
        (
            "logflow_source_outstanding_messages",
            "gauge",
            "Messages held now (received, not yet acked or nacked).",
            |s| s.outstanding,
        ),
        (
            "logflow_source_outstanding_messages_peak",
            "gauge",
            "Most messages held at once since start.",
            |s| s.peak_outstanding,
        ),
        (
            "logflow_source_outstanding_bytes",
            "gauge",
            "Payload and attribute bytes held now.",
            |s| s.outstanding_bytes,
        ),
        (
            "logflow_schema_reloads_total",
            "counter",
            "New schema versions taken into use without a restart.",
            |s| s.schema_reloads,
        ),
        (
            "logflow_schema_reloads_refused_total",
            "counter",
            "New schema versions refused (incompatible or not compiling); the previous one stays.",
            |s| s.schema_reloads_refused,
        ),
        (
            "logflow_source_stream_reopens_total",
            "counter",
            "StreamingPull streams re-opened (error, end, or idle watchdog).",
            |s| s.stream_reopens,
        ),
        (
            "logflow_source_redelivered_messages_total",
            "counter",
            "Messages with a delivery attempt above 1 (needs a dead-letter policy).",
            |s| s.redelivered,
        ),
        (
            "logflow_source_lease_expired_messages_total",
            "counter",
            "Messages decided after their maximum lease (likely redelivered).",
            |s| s.lease_expired,
        ),
    ];
    // Written in place: a scrape allocates little more than the output (it used to format
    // each line into a string of its own, hundreds of allocations per scrape).
    let mut out = String::with_capacity(16 << 10);
    for (name, kind, help, get) in metrics {
        line(
            &mut out,
            format_args!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
        );
        for (pipeline, s) in &snaps {
            line(
                &mut out,
                format_args!("{name}{{pipeline=\"{pipeline}\"}} {}\n", get(s)),
            );
        }
    }
    let name = "logflow_deadletter_messages_by_class_total";
    line(
        &mut out,
        format_args!(
            "# HELP {name} Dead letters written, by error class.\n# TYPE {name} counter\n"
        ),
    );
    for (pipeline, stats) in pipelines {
        for (class, n) in stats.dead_letters_by_class() {
            line(
                &mut out,
                format_args!("{name}{{pipeline=\"{pipeline}\",class=\"{class}\"}} {n}\n"),
            );
        }
    }
    let name = "logflow_sink_retries_by_reason_total";
    line(
        &mut out,
        format_args!(
            "# HELP {name} Write attempts retried, by sink and reason.\n# TYPE {name} counter\n"
        ),
    );
    for (pipeline, stats) in pipelines {
        for ((sink, reason), n) in stats.retries_by_reason() {
            line(
                &mut out,
                format_args!(
                    "{name}{{pipeline=\"{pipeline}\",sink=\"{sink}\",reason=\"{reason}\"}} {n}\n"
                ),
            );
        }
    }
    type Hist = fn(&Stats) -> &logflow_core::stats::Histogram;
    let histograms: [(&str, &str, Hist); 8] = [
        (
            "logflow_source_ack_lag_seconds",
            "Publish to ack time of acked messages.",
            |s| &s.ack_lag,
        ),
        (
            "logflow_source_held_seconds",
            "Receipt to ack time of acked messages (how long the worker held them).",
            |s| &s.held_for,
        ),
        (
            "logflow_archive_flush_seconds",
            "Time to write one raw-archive object, retries included.",
            |s| &s.archive_flush,
        ),
        (
            "logflow_bigquery_insert_seconds",
            "Time of one insertAll batch, retries included.",
            |s| &s.insert_flush,
        ),
        (
            "logflow_deadletter_flush_seconds",
            "Time to write one dead-letter object, retries included.",
            |s| &s.dead_letter_flush,
        ),
        (
            "logflow_archive_batch_messages",
            "Messages per raw-archive object.",
            |s| &s.archive_batch,
        ),
        (
            "logflow_bigquery_batch_rows",
            "Rows per BigQuery insertAll or AppendRows batch.",
            |s| &s.insert_batch,
        ),
        (
            "logflow_source_burst_messages",
            "Messages the source handed to the stages at once (what its streams had ready).",
            |s| &s.source_burst,
        ),
    ];
    for (name, help, get) in histograms {
        line(
            &mut out,
            format_args!("# HELP {name} {help}\n# TYPE {name} histogram\n"),
        );
        for (pipeline, stats) in pipelines {
            let h = get(stats).snapshot();
            for (le, n) in &h.cumulative {
                if le.is_infinite() {
                    line(
                        &mut out,
                        format_args!("{name}_bucket{{pipeline=\"{pipeline}\",le=\"+Inf\"}} {n}\n"),
                    );
                } else {
                    line(
                        &mut out,
                        format_args!("{name}_bucket{{pipeline=\"{pipeline}\",le=\"{le}\"}} {n}\n"),
                    );
                }
            }
            line(
                &mut out,
                format_args!(
                    "{name}_sum{{pipeline=\"{pipeline}\"}} {}\n{name}_count{{pipeline=\"{pipeline}\"}} {}\n",
                    h.sum, h.count
                ),
            );
        }
    }
    out
}

/// Appends formatted text to the metrics page.
fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    use std::fmt::Write as _;
    out.write_fmt(args)
        .expect("formatting into a String does not fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_has_one_series_per_pipeline() {
        let a = Arc::new(Stats::default());
        a.add(&a.received, 3);
        a.hold(100);
        a.ack_lag.observe_micros(1_500_000);
        a.add_dead_letters("invalid_protobuf", 2);
        a.add_dead_letters("unknown_message_type", 1);
        a.add_dead_letters("invalid_protobuf", 3);
        a.add_retry("gcs", "http_503");
        a.add_retry("gcs", "http_503");
        a.add_retry("bigquery", "timeout");
        let text = render_metrics(&[
            ("http".into(), a),
            ("auth".into(), Arc::new(Stats::default())),
        ]);
        assert!(text.contains("# TYPE logflow_source_received_messages_total counter"));
        assert!(text.contains("logflow_source_received_messages_total{pipeline=\"http\"} 3\n"));
        assert!(text.contains("logflow_source_received_messages_total{pipeline=\"auth\"} 0\n"));
        assert!(text.contains("logflow_source_outstanding_messages{pipeline=\"http\"} 1\n"));
        assert!(text.contains("logflow_source_outstanding_bytes{pipeline=\"http\"} 100\n"));
        assert!(text.contains("# TYPE logflow_source_ack_lag_seconds histogram"));
        assert!(text.contains("# TYPE logflow_source_held_seconds histogram"));
        assert!(text.contains(
            "logflow_deadletter_messages_by_class_total{pipeline=\"http\",class=\"invalid_protobuf\"} 5\n"
        ));
        assert!(text.contains(
            "logflow_deadletter_messages_by_class_total{pipeline=\"http\",class=\"unknown_message_type\"} 1\n"
        ));
        assert!(text.contains(
            "logflow_sink_retries_by_reason_total{pipeline=\"http\",sink=\"gcs\",reason=\"http_503\"} 2\n"
        ));
        assert!(text.contains(
            "logflow_sink_retries_by_reason_total{pipeline=\"http\",sink=\"bigquery\",reason=\"timeout\"} 1\n"
        ));
        assert!(text.contains("logflow_sink_retries_total{pipeline=\"http\"} 3\n"));
        assert!(
            text.contains("logflow_source_ack_lag_seconds_bucket{pipeline=\"http\",le=\"1\"} 0\n")
        );
        assert!(
            text.contains(
                "logflow_source_ack_lag_seconds_bucket{pipeline=\"http\",le=\"2.5\"} 1\n"
            )
        );
        assert!(
            text.contains(
                "logflow_source_ack_lag_seconds_bucket{pipeline=\"http\",le=\"+Inf\"} 1\n"
            )
        );
        assert!(text.contains("logflow_source_ack_lag_seconds_sum{pipeline=\"http\"} 1.5\n"));
        assert!(text.contains("logflow_source_ack_lag_seconds_count{pipeline=\"auth\"} 0\n"));
    }

    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/grafana/logflow-dashboard.json"
        );
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let text = render_metrics(&[("p".into(), Arc::new(Stats::default()))]);
        let mut seen = 0;
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("logflow_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    let base = name.strip_suffix("_bucket").unwrap_or(&name);
                    assert!(
                        text.contains(&format!("# TYPE {base} ")),
                        "panel {:?} uses {name}, which /metrics does not export",
                        panel["title"]
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen >= 10, "{seen}");
    }

    #[test]
    fn a_pipeline_holding_messages_without_progress_is_not_live() {
        use std::time::Instant;
        let stats = Arc::new(Stats::default());
        let pipelines = vec![("http".to_string(), Arc::clone(&stats))];
        let live = Liveness::new(vec![Duration::from_secs(600)]);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Idle for an hour: alive.
        assert!(live.check(&pipelines, at(3600)).is_ok());
        // Holding, deciding now and then: alive.
        stats.hold(10);
        assert!(live.check(&pipelines, at(3601)).is_ok());
        stats.add(&stats.acked, 1);
        assert!(live.check(&pipelines, at(4000)).is_ok());
        assert!(live.check(&pipelines, at(4500)).is_ok());
        // Holding, nothing decided for more than the limit: stuck.
        let e = live.check(&pipelines, at(4601)).unwrap_err();
        assert!(
            e.contains("pipeline http") && e.contains("holding 1"),
            "{e}"
        );
        // A nack is progress too.
        stats.add(&stats.nacked, 1);
        assert!(live.check(&pipelines, at(4602)).is_ok());
        // Nothing held any more: alive however long it stays so.
        stats.release(10);
        assert!(live.check(&pipelines, at(99_999)).is_ok());
    }

    #[tokio::test]
    async fn an_address_in_use_is_refused_naming_the_setting() {
        let taken = bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind(&addr).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("admin_listen {addr}: cannot bind")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn readiness_turns_false_while_a_sink_fails_and_on_shutdown() {
        let stats = Arc::new(Stats::default());
        let state = Arc::new(AdminState {
            pipelines: vec![("http".into(), Arc::clone(&stats))],
            ready: AtomicBool::new(true),
            liveness: Liveness::new(Vec::new()),
        });
        let addr = serve("127.0.0.1:0", Arc::clone(&state)).await.unwrap();
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            s
        };
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        stats.failed_writes_in_a_row.store(2, Ordering::Relaxed);
        let r = get("/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("pipeline http: 2 batch writes failed"),
            "{r}"
        );
        stats.failed_writes_in_a_row.store(0, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        stats.stream_failures_in_a_row.store(2, Ordering::Relaxed);
        assert!(
            get("/readyz").await.starts_with("HTTP/1.1 200"),
            "two blips are ready"
        );
        stats.stream_failures_in_a_row.store(3, Ordering::Relaxed);
        let r = get("/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("StreamingPull failed 3 times"),
            "{r}"
        );
        stats.stream_failures_in_a_row.store(0, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        state.ready.store(false, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    }
}
