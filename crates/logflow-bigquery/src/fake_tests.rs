//! insertAll against a scripted HTTP fake, for what local-bigquery cannot produce: 5xx, 429,
//! dropped connections, and the `stopped` resend path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use logflow_core::{Classify, ErrorClass, NoAuth, RetryPolicy, Stats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::{BigQuery, BigQueryOptions};

/// One scripted answer: `None` closes the connection without answering.
type Answer = Option<(u16, &'static str)>;

/// Serves `answers` in order on 127.0.0.1, one per connection; records each request's head
/// (request line and headers) and body.
async fn fake(answers: Vec<Answer>) -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    tokio::spawn(async move {
        for answer in answers {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then the body by Content-Length.
            let (head_end, len) = loop {
                let n = conn.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    break (i + 4, len);
                }
            };
            while buf.len() < head_end + len {
                let n = conn.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            seen.lock().unwrap().push((
                String::from_utf8_lossy(&buf[..head_end]).into_owned(),
                String::from_utf8_lossy(&buf[head_end..]).into_owned(),
            ));
            match answer {
                None => drop(conn),
                Some((status, body)) => {
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    conn.write_all(resp.as_bytes()).await.ok();
                    conn.shutdown().await.ok();
                }
            }
        }
    });
    (format!("http://{addr}"), bodies)
}

async fn client(endpoint: String, max_attempts: u32) -> BigQuery {
    BigQuery::new(BigQueryOptions {
        emulator_endpoint: Some(endpoint),
        project: "p".into(),
        retry: RetryPolicy {
            max_attempts,
            max_elapsed: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        },
        tokens: Arc::new(NoAuth),
        max_request_bytes: crate::DEFAULT_MAX_REQUEST_BYTES,
        storage_emulator_endpoint: None,
        request_timeout: std::time::Duration::from_secs(60),
    })
    .await
    .unwrap()
}

/// `ROWS` inserted through a client of `endpoint` that makes at most `max_attempts` attempts.
async fn insert_rows(
    endpoint: String,
    max_attempts: u32,
) -> Result<crate::InsertOutcome, crate::BqError> {
    client(endpoint, max_attempts)
        .await
        .insert_all("d", "t", &ROWS, &Stats::default())
        .await
}

const ROWS: [(&str, &[u8]); 2] = [("id-0", br#"{"a":1}"#), ("id-1", br#"{"a":2}"#)];
const OK: &str = r#"{"kind":"bigquery#tableDataInsertAllResponse"}"#;

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried() {
    let (ep, bodies) = fake(vec![
        Some((503, r#"{"error":{"code":503,"message":"backend","errors":[{"reason":"backendError"}]}}"#)),
        None,
        Some((429, r#"{"error":{"code":429,"message":"slow down","errors":[{"reason":"rateLimitExceeded"}]}}"#)),
        Some((200, OK)),
    ])
    .await;
    let stats = Stats::default();
    let out = client(ep, 10)
        .await
        .insert_all("d", "t", &ROWS, &stats)
        .await
        .unwrap();
    assert!(out.rejected.is_empty());
    assert_eq!(bodies.lock().unwrap().len(), 4);
    assert_eq!(stats.snapshot().retries, 3);
}

#[tokio::test]
async fn a_missing_table_is_permanent_and_not_retried() {
    let (ep, bodies) = fake(vec![
        Some((404, r#"{"error":{"code":404,"message":"Not found: Table p:d.t","errors":[{"reason":"notFound"}]}}"#)),
        Some((200, OK)),
    ])
    .await;
    let e = insert_rows(ep, 10).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent, "{e}");
    assert!(e.to_string().contains("notFound"), "{e}");
    assert_eq!(bodies.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn retries_are_bounded() {
    let (ep, bodies) = fake(vec![Some((500, "{}")); 5]).await;
    let e = insert_rows(ep, 3).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient);
    assert_eq!(bodies.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn stopped_rows_are_resent_and_invalid_rows_reported() {
    let (ep, bodies) = fake(vec![
        Some((
            200,
            r#"{"insertErrors":[{"index":0,"errors":[{"reason":"stopped"}]},{"index":1,"errors":[{"reason":"invalid","location":"a","message":"bad"}]}]}"#,
        )),
        Some((200, OK)),
    ])
    .await;
    let out = insert_rows(ep, 10).await.unwrap();
    assert_eq!(out.rejected.len(), 1);
    assert_eq!(out.rejected[0].index, 1);
    assert_eq!(out.rejected[0].message, "a: bad");
    let bodies = bodies.lock().unwrap();
    let resent: serde_json::Value = serde_json::from_str(&bodies[1].1).unwrap();
    assert_eq!(resent["rows"].as_array().unwrap().len(), 1);
    assert_eq!(resent["rows"][0]["insertId"], "id-0");
}

/// local-bigquery applies only top-level column additions, so the nested case of schema
/// evolution is checked here: a field added inside a RECORD is patched into the table with the
/// etag of what was read, and a concurrent change (412) makes the client read again.
#[tokio::test]
async fn a_field_added_inside_a_record_is_patched_with_the_etag() {
    let table = |etag: &str, with_c: bool| {
        let mut req = serde_json::json!([{"name": "a", "type": "STRING", "mode": "NULLABLE"}]);
        if with_c {
            req.as_array_mut()
                .unwrap()
                .push(serde_json::json!({"name": "c", "type": "STRING", "mode": "NULLABLE"}));
        }
        serde_json::json!({
            "etag": etag,
            "schema": {"fields": [
                {"name": "_message_id", "type": "STRING", "mode": "REQUIRED"},
                {"name": "request", "type": "RECORD", "mode": "NULLABLE", "fields": req},
            ]}
        })
        .to_string()
        .leak() as &'static str
    };
    let (ep, seen) = fake(vec![
        Some((200, table("etag-1", false))),
        Some((
            412,
            r#"{"error":{"code":412,"message":"Precondition check failed."}}"#,
        )),
        // Someone else added `c` meanwhile: the client must keep it and add `b`.
        Some((200, table("etag-2", true))),
        Some((200, "{}")),
    ])
    .await;
    let bq = client(ep, 3).await;
    let desired = serde_json::json!({"fields": [
        {"name": "_message_id", "type": "STRING", "mode": "REQUIRED"},
        {"name": "request", "type": "RECORD", "mode": "NULLABLE", "fields": [
            {"name": "a", "type": "STRING", "mode": "NULLABLE"},
            {"name": "b", "type": "RECORD", "mode": "NULLABLE", "fields": [
                {"name": "x", "type": "INT64", "mode": "NULLABLE"}]},
        ]},
    ]});
    let status = bq.ensure_table("ds", "t", desired, &[]).await.unwrap();
    assert!(!status.created);
    assert_eq!(status.added, ["request.b"]);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    let (patch1, patch2) = (&seen[1], &seen[3]);
    for (head, etag) in [(&patch1.0, "etag-1"), (&patch2.0, "etag-2")] {
        assert!(head.starts_with("PATCH /"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("if-match: {etag}")),
            "{head}"
        );
    }
    assert!(
        seen[2].0.starts_with("GET /"),
        "re-read after 412: {}",
        seen[2].0
    );
    let sent: serde_json::Value = serde_json::from_str(&patch2.1).unwrap();
    let request = &sent["schema"]["fields"][1];
    let names: Vec<&str> = request["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "c", "b"], "{sent}");
    assert_eq!(request["fields"][2]["fields"][0]["name"], "x");
}

#[tokio::test]
async fn a_row_listed_twice_is_rejected_once() {
    // Two insertErrors entries for row 0, one for row 1: the rejections must stay in step
    // with the rows (a repeated index would otherwise shift every later rejection).
    let (ep, _) = fake(vec![Some((
        200,
        r#"{"insertErrors":[{"index":0,"errors":[{"reason":"invalid","message":"first"}]},{"index":1,"errors":[{"reason":"invalid","message":"other"}]},{"index":0,"errors":[{"reason":"invalid","message":"second"}]}]}"#,
    ))])
    .await;
    let out = insert_rows(ep, 10).await.unwrap();
    let got: Vec<(usize, &str)> = out
        .rejected
        .iter()
        .map(|r| (r.index, r.message.as_str()))
        .collect();
    assert_eq!(got, [(0, "first"), (1, "other")]);
}

#[tokio::test]
async fn rows_failed_by_the_service_are_resent_not_rejected() {
    let (ep, bodies) = fake(vec![
        Some((
            200,
            r#"{"insertErrors":[{"index":0,"errors":[{"reason":"backendError","message":"try again"}]},{"index":1,"errors":[{"reason":"timeout"}]}]}"#,
        )),
        Some((
            200,
            r#"{"insertErrors":[{"index":1,"errors":[{"reason":"internalError"}]}]}"#,
        )),
        Some((200, OK)),
    ])
    .await;
    let out = insert_rows(ep, 10).await.unwrap();
    assert!(out.rejected.is_empty(), "{out:?}");
    let bodies = bodies.lock().unwrap();
    let ids = |i: usize| {
        let v: serde_json::Value = serde_json::from_str(&bodies[i].1).unwrap();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["insertId"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (ids(1), ids(2)),
        (vec!["id-0".into(), "id-1".into()], vec!["id-1".into()])
    );
}

#[tokio::test]
async fn a_query_waits_for_its_job_and_reads_every_page() {
    const JOB: &str = r#""jobReference":{"projectId":"p","jobId":"j1","location":"EU"}"#;
    let running = format!(r#"{{"jobComplete":false,{JOB}}}"#);
    let page1 = format!(
        r#"{{"jobComplete":true,{JOB},"totalRows":"2","rows":[{{"f":[{{"v":"a"}}]}}],"pageToken":"t2"}}"#
    );
    let page2 =
        format!(r#"{{"jobComplete":true,{JOB},"totalRows":"2","rows":[{{"f":[{{"v":"b"}}]}}]}}"#);
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let (ep, requests) = fake(vec![
        // The query outlives the request's wait: no rows yet.
        Some((200, leak(running.clone()))),
        // A dropped connection on the way: retried.
        None,
        Some((200, leak(running))),
        Some((200, leak(page1))),
        Some((200, leak(page2))),
    ])
    .await;
    let rows = client(ep, 5)
        .await
        .query("SELECT x FROM d.t")
        .await
        .unwrap();
    let cells: Vec<_> = rows.iter().map(|r| r[0].clone()).collect();
    assert_eq!(cells, vec![Some("a".into()), Some("b".into())]);
    let heads: Vec<String> = requests
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| h.clone())
        .collect();
    assert_eq!(heads.len(), 5, "{heads:?}");
    assert!(
        heads[0].starts_with("POST /bigquery/v2/projects/p/queries "),
        "{heads:?}"
    );
    for h in &heads[1..] {
        assert!(
            h.starts_with("GET /bigquery/v2/projects/p/queries/j1?"),
            "{h}"
        );
        assert!(h.contains("location=EU"), "{h}");
    }
    assert!(heads[4].contains("pageToken=t2"), "{}", heads[4]);
}
