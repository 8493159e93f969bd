//! insertAll with pre-serialised rows, plus the table administration the sink needs.

use std::sync::Arc;
use std::time::Duration;

use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::model::get_query_results_parameters::GetQueryResultsParameters;
use gcp_bigquery_client::model::query_request::QueryRequest;
use gcp_bigquery_client::model::table::Table;
use logflow_core::json::push_str;
use logflow_core::{RetryPolicy, Stats, TokenError, TokenProvider};
use serde::Deserialize;
use tracing::warn;

use crate::auth::BqAuthenticator;
use crate::error::BqError;
use crate::storage_write::{MAX_APPEND_ROW_BYTES, ProtoRowSchema, StorageWriteClient};

const BIGQUERY_API: &str = "https://bigquery.googleapis.com/bigquery/v2";
/// BigQuery rejects insertAll requests over 10 MB; stay under it with room for headers.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 9 * 1024 * 1024;
/// The largest row JSON worth sending: a row over it would not fit a request on its own (with
/// room for the request's head and the row's `insertId`). BigQuery would refuse that request
/// as a whole, on every redelivery, so callers dead-letter such a row instead. Rows for the
/// Storage Write API are converted from the same JSON, and its requests have the same 10 MB
/// limit.
pub const MAX_ROW_BYTES: usize = DEFAULT_MAX_REQUEST_BYTES - 64 * 1024;
/// `stopped` rows are re-sent at most this many times (they only fail when another row of the
/// same request was invalid, which `skipInvalidRows` normally prevents), and so are rows that
/// failed for the service's own trouble; rows still failing then fail the batch (transient:
/// its messages are redelivered), they are not dead-lettered.
const MAX_STOPPED_RESENDS: usize = 3;
/// Per-row `insertErrors` reasons that say nothing about the row's data.
const RETRYABLE_ROW_REASONS: &[&str] = &["stopped", "backendError", "internalError", "timeout"];

/// How to reach BigQuery.
#[derive(Debug, Clone)]
pub struct BigQueryOptions {
    /// Emulator base URL (`http://127.0.0.1:9050`); `None` for real BigQuery.
    pub emulator_endpoint: Option<String>,
    /// Project of the datasets.
    pub project: String,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Bearer tokens.
    pub tokens: Arc<dyn TokenProvider>,
    /// Largest insertAll body.
    pub max_request_bytes: usize,
    /// Bound on one attempt of any request (a hung connection becomes a transient error).
    pub request_timeout: Duration,
    /// Storage Write API emulator (`http://127.0.0.1:9060`, plain gRPC); `None` for the real
    /// service.
    pub storage_emulator_endpoint: Option<String>,
}

/// A row BigQuery refused as invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRejection {
    /// Index of the row in the slice given to [`BigQuery::insert_all`].
    pub index: usize,
    /// BigQuery's reason (`invalid`).
    pub reason: String,
    /// BigQuery's message, with the column location when given.
    pub message: String,
}

/// Rows converted to the protobuf rows of a table's schema for the Storage Write API, and
/// those that did not convert.
#[derive(Debug)]
pub struct AppendRows {
    encoded: Vec<Vec<u8>>,
    /// The input position of each encoded row.
    index: Vec<usize>,
    /// Rows that did not convert.
    outcome: InsertOutcome,
}

impl AppendRows {
    /// Converts row JSON objects (as the transcoder writes them for insertAll) to `schema`'s
    /// protobuf rows. CPU-bound: call from a blocking task.
    pub fn encode<'a>(schema: &ProtoRowSchema, rows: impl Iterator<Item = &'a [u8]>) -> Self {
        let mut out = AppendRows {
            encoded: Vec::new(),
            index: Vec::new(),
            outcome: InsertOutcome::default(),
        };
        for (i, json) in rows.enumerate() {
            let mut row = Vec::with_capacity(json.len());
            match schema.encode_row(json, &mut row) {
                Ok(()) if row.len() > MAX_APPEND_ROW_BYTES => {
                    out.outcome.rejected.push(RowRejection {
                        index: i,
                        reason: "invalid".into(),
                        message: format!(
                            "the row is {} bytes of protobuf, over the {MAX_APPEND_ROW_BYTES} \
                             bytes an AppendRows request can carry",
                            row.len()
                        ),
                    });
                }
                Ok(()) => {
                    out.encoded.push(row);
                    out.index.push(i);
                }
                Err(message) => out.outcome.rejected.push(RowRejection {
                    index: i,
                    reason: "invalid".into(),
                    message,
                }),
            }
        }
        out
    }
}

/// What happened to the rows of an insert: all not listed as rejected were accepted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InsertOutcome {
    /// Rows refused as invalid, sorted by index, one entry per row.
    pub rejected: Vec<RowRejection>,
}

impl InsertOutcome {
    /// Sorts the rejections by row and keeps the first of each row's: a response may list
    /// several errors for one row, and callers walk the rows and the rejections in step.
    fn settle(mut self) -> Self {
        self.rejected.sort_by_key(|r| r.index);
        self.rejected.dedup_by_key(|r| r.index);
        self
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InsertAllResponse {
    #[serde(default)]
    insert_errors: Vec<InsertErrors>,
}

#[derive(Deserialize)]
struct InsertErrors {
    index: usize,
    #[serde(default)]
    errors: Vec<ErrorProto>,
}

#[derive(Deserialize)]
struct ErrorProto {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    location: String,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<ErrorProto>,
}

/// Attempts at adding columns while other writers change the table.
const PATCH_ATTEMPTS: usize = 3;

/// What [`BigQuery::ensure_table`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableStatus {
    /// The table was created.
    pub created: bool,
    /// Columns added to an existing table (dotted paths).
    pub added: Vec<String>,
    /// Columns of the existing table that cannot take the new rows (left as they are).
    pub conflicts: Vec<String>,
}

/// BigQuery client of one worker, shared by its pipelines.
#[derive(Clone)]
pub struct BigQuery {
    http: reqwest::Client,
    base: String,
    admin: gcp_bigquery_client::Client,
    storage: StorageWriteClient,
    options: BigQueryOptions,
}

impl std::fmt::Debug for BigQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BigQuery")
            .field("base", &self.base)
            .field("project", &self.options.project)
            .finish()
    }
}

impl BigQuery {
    /// Builds the client.
    pub async fn new(options: BigQueryOptions) -> Result<Self, BqError> {
        let base = match &options.emulator_endpoint {
            Some(ep) => format!("{}/bigquery/v2", ep.trim_end_matches('/')),
            None => BIGQUERY_API.to_string(),
        };
        let http = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| BqError::Auth(TokenError::permanent(e.to_string())))?;
        let auth = Arc::new(BqAuthenticator(Arc::clone(&options.tokens)));
        let admin = gcp_bigquery_client::client_builder::ClientBuilder::new()
            .with_v2_base_url(base.clone())
            .with_client(http.clone())
            .build_from_authenticator(auth)
            .await
            .map_err(|e| BqError::Auth(TokenError::permanent(e.to_string())))?;
        let storage = StorageWriteClient::new(
            options.storage_emulator_endpoint.as_deref(),
            options.request_timeout,
        )?;
        Ok(BigQuery {
            http,
            base,
            admin,
            storage,
            options,
        })
    }

    /// Appends `rows` (`(message_id, row JSON object)`, as for [`BigQuery::insert_all`]) to
    /// the `_default` stream of `dataset.table` with the Storage Write API, as protobuf rows of
    /// `schema` (the table's). A row that does not convert, or that BigQuery refuses, is
    /// returned as rejected; the message id is not sent (the stream is at-least-once).
    ///
    /// The conversion is CPU work (≈ 2.5 µs a row): a caller on the async runtime converts in
    /// a blocking task with [`AppendRows::encode`] and sends with [`BigQuery::append_encoded`].
    pub async fn append_rows(
        &self,
        dataset: &str,
        table: &str,
        schema: &ProtoRowSchema,
        rows: &[(&str, &[u8])],
        stats: &Stats,
    ) -> Result<InsertOutcome, BqError> {
        let encoded = AppendRows::encode(schema, rows.iter().map(|r| r.1));
        self.append_encoded(dataset, table, schema, encoded, stats)
            .await
    }

    /// Appends rows converted by [`AppendRows::encode`] (see [`BigQuery::append_rows`]).
    pub async fn append_encoded(
        &self,
        dataset: &str,
        table: &str,
        schema: &ProtoRowSchema,
        rows: AppendRows,
        stats: &Stats,
    ) -> Result<InsertOutcome, BqError> {
        let AppendRows {
            encoded,
            index,
            mut outcome,
        } = rows;
        if !encoded.is_empty() {
            let stream_table = format!(
                "projects/{}/datasets/{dataset}/tables/{table}",
                self.options.project
            );
            let refused = crate::storage_write::append_all(
                &self.storage,
                &stream_table,
                schema,
                &encoded,
                &self.options.retry,
                &self.options.tokens,
                stats,
            )
            .await?;
            outcome
                .rejected
                .extend(refused.into_iter().map(|(i, message)| RowRejection {
                    index: index[i],
                    reason: "invalid".into(),
                    message,
                }));
        }
        Ok(outcome.settle())
    }

    /// The project of the datasets.
    pub fn project(&self) -> &str {
        &self.options.project
    }

    /// Inserts `rows` (`(insert_id, row JSON object)`) into `dataset.table`, in as many requests
    /// as the size limit needs. Transient failures are retried; per-row rejections are returned.
    pub async fn insert_all(
        &self,
        dataset: &str,
        table: &str,
        rows: &[(&str, &[u8])],
        stats: &Stats,
    ) -> Result<InsertOutcome, BqError> {
        let url = format!(
            "{}/projects/{}/datasets/{dataset}/tables/{table}/insertAll",
            self.base, self.options.project
        );
        let target = format!("{dataset}.{table}");
        let mut outcome = InsertOutcome::default();
        // One retry budget for the whole call: its requests (a batch split by size, rows sent
        // again) share it, so that a batch is given up within the bound `max_lease` assumes.
        let deadline = self.options.retry.deadline();
        let mut start = 0;
        while start < rows.len() {
            let (end, body) = build_body(rows, start, self.options.max_request_bytes);
            let mut pending: Vec<usize> = (start..end).collect();
            let mut body = body;
            for resend in 0..=MAX_STOPPED_RESENDS {
                let errors = self
                    .send_insert(&url, &target, body, deadline, stats)
                    .await?;
                let mut stopped = Vec::new();
                for e in errors {
                    let Some(&row) = pending.get(e.index) else {
                        return Err(BqError::Protocol {
                            op: "insertAll",
                            target,
                            message: format!("insertErrors index {} out of range", e.index),
                        });
                    };
                    // A row is refused for its data unless every reason given is a retryable
                    // one: `stopped` (another row was invalid) or the service's own trouble.
                    let invalid = e
                        .errors
                        .iter()
                        .find(|x| !RETRYABLE_ROW_REASONS.contains(&x.reason.as_str()));
                    match invalid {
                        Some(x) => outcome.rejected.push(RowRejection {
                            index: row,
                            reason: x.reason.clone(),
                            message: if x.location.is_empty() {
                                x.message.clone()
                            } else {
                                format!("{}: {}", x.location, x.message)
                            },
                        }),
                        None => stopped.push(row),
                    }
                }
                if stopped.is_empty() {
                    break;
                }
                if resend == MAX_STOPPED_RESENDS {
                    return Err(BqError::Protocol {
                        op: "insertAll",
                        target,
                        message: format!(
                            "{} rows still `stopped` or failing for the service's trouble after {MAX_STOPPED_RESENDS} resends",
                            stopped.len()
                        ),
                    });
                }
                let subset: Vec<(&str, &[u8])> = stopped.iter().map(|&i| rows[i]).collect();
                body = build_body(&subset, 0, usize::MAX).1;
                pending = stopped;
            }
            start = end;
        }
        Ok(outcome.settle())
    }

    async fn send_insert(
        &self,
        url: &str,
        target: &str,
        body: Vec<u8>,
        deadline: Option<tokio::time::Instant>,
        stats: &Stats,
    ) -> Result<Vec<InsertErrors>, BqError> {
        let body = bytes::Bytes::from(body);
        self.options
            .retry
            .run_until(
                deadline,
                || {
                    let body = body.clone();
                    async move {
                        let mut req = self.http.post(url).header("content-type", "application/json").body(body);
                        if let Some(t) = self.options.tokens.token().await.map_err(BqError::Auth)? {
                            req = req.bearer_auth(t);
                        }
                        let resp = req.send().await.map_err(|e| BqError::Transport {
                            op: "insertAll",
                            target: target.to_string(),
                            message: transport_message(&e),
                        })?;
                        let status = resp.status().as_u16();
                        let text = resp.bytes().await.map_err(|e| BqError::Transport {
                            op: "insertAll",
                            target: target.to_string(),
                            message: transport_message(&e),
                        })?;
                        if !(200..300).contains(&status) {
                            return Err(http_error("insertAll", target, status, &text));
                        }
                        let parsed: InsertAllResponse = serde_json::from_slice(&text).map_err(|e| BqError::Protocol {
                            op: "insertAll",
                            target: target.to_string(),
                            message: e.to_string(),
                        })?;
                        Ok(parsed.insert_errors)
                    }
                },
                |e, n| {
                    stats.add_retry("bigquery", e.retry_reason());
                    warn!(table = target, attempt = n, error = %e, "bigquery insert failed, retrying");
                },
            )
            .await
    }

    /// Makes `dataset.table` fit `schema` (a `{"fields": [...]}` object): creates it, partitioned
    /// by day on `_publish_time`, when missing; otherwise adds the columns it lacks (a
    /// `tables.patch` guarded by the table's etag, re-read and retried on a conflict). Columns are
    /// never dropped or retyped: those conflicts are returned, not applied. A missing dataset is a
    /// permanent error.
    pub async fn ensure_table(
        &self,
        dataset: &str,
        table: &str,
        schema: serde_json::Value,
        clustering: &[String],
    ) -> Result<TableStatus, BqError> {
        let (target, url) = self.table_url(dataset, table);
        for _ in 0..PATCH_ATTEMPTS {
            let Some((etag, current)) = self.get_json(&url, &target).await? else {
                match self
                    .create_table(dataset, table, schema.clone(), clustering)
                    .await
                {
                    // Another worker created it first: read it again (a bounded number of
                    // times: a read that still misses it counts as an attempt).
                    Err(BqError::Http { status: 409, .. }) => continue,
                    r => return r,
                }
            };
            let existing = current
                .pointer("/schema/fields")
                .cloned()
                .unwrap_or_default();
            let diff = crate::evolve::diff(&existing, &schema["fields"]);
            let Some(merged) = diff.merged else {
                return Ok(TableStatus {
                    created: false,
                    added: Vec::new(),
                    conflicts: diff.conflicts,
                });
            };
            let mut req = self
                .http
                .patch(&url)
                .json(&serde_json::json!({"schema": {"fields": merged}}));
            if let Some(etag) = &etag {
                req = req.header("if-match", etag.as_str());
            }
            let status = self.send_admin(req, "tables.patch", &target).await?;
            if status == 412 {
                warn!(table = %target, "table changed while adding columns; re-reading");
                continue;
            }
            return Ok(TableStatus {
                created: false,
                added: diff.added,
                conflicts: diff.conflicts,
            });
        }
        Err(BqError::Protocol {
            op: "tables.patch",
            target,
            message: format!(
                "the table kept changing (created or extended by another worker meanwhile); gave up after {PATCH_ATTEMPTS} attempts"
            ),
        })
    }

    /// `dataset.table` (for errors) and the table's resource URL.
    fn table_url(&self, dataset: &str, table: &str) -> (String, String) {
        (
            format!("{dataset}.{table}"),
            format!(
                "{}/projects/{}/datasets/{dataset}/tables/{table}",
                self.base, self.options.project
            ),
        )
    }

    /// The table's current schema (`{"fields": [...]}`, as `tables.get` gives it), or `None`
    /// when there is no such table.
    pub async fn table_schema(
        &self,
        dataset: &str,
        table: &str,
    ) -> Result<Option<serde_json::Value>, BqError> {
        let (target, url) = self.table_url(dataset, table);
        Ok(self.get_json(&url, &target).await?.map(|(_, t)| {
            serde_json::json!({"fields": t.pointer("/schema/fields").cloned().unwrap_or_default()})
        }))
    }

    async fn create_table(
        &self,
        dataset: &str,
        table: &str,
        schema: serde_json::Value,
        clustering: &[String],
    ) -> Result<TableStatus, BqError> {
        let project = self.options.project.clone();
        let target = format!("{dataset}.{table}");
        let mut resource = serde_json::json!({
            "tableReference": {"projectId": project, "datasetId": dataset, "tableId": table},
            "schema": schema,
            "timePartitioning": {"type": "DAY", "field": "_publish_time"},
            "description": "Written by logflow: one row per Pub/Sub message, insertId = _message_id.",
        });
        if !clustering.is_empty() {
            resource["clustering"] = serde_json::json!({ "fields": clustering });
        }
        let table_res: Table = serde_json::from_value(resource).map_err(|e| BqError::Protocol {
            op: "tables.insert",
            target: target.clone(),
            message: e.to_string(),
        })?;
        match self.admin.table().create(table_res).await {
            Ok(_) => Ok(TableStatus {
                created: true,
                ..TableStatus::default()
            }),
            Err(e) => Err(admin_error("tables.insert", &target, e)),
        }
    }

    /// Whether `dataset` exists in the project (`Err` when BigQuery cannot be asked).
    pub async fn dataset_exists(&self, dataset: &str) -> Result<bool, BqError> {
        let url = format!(
            "{}/projects/{}/datasets/{dataset}",
            self.base, self.options.project
        );
        Ok(self.get_json(&url, dataset).await?.is_some())
    }

    /// GETs a resource: `None` on 404, else its etag and body.
    async fn get_json(
        &self,
        url: &str,
        target: &str,
    ) -> Result<Option<(Option<String>, serde_json::Value)>, BqError> {
        let mut req = self.http.get(url);
        if let Some(t) = self.options.tokens.token().await.map_err(BqError::Auth)? {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| BqError::Transport {
            op: "tables.get",
            target: target.to_string(),
            message: transport_message(&e),
        })?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| BqError::Transport {
            op: "tables.get",
            target: target.to_string(),
            message: transport_message(&e),
        })?;
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(http_error("tables.get", target, status, &body));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| BqError::Protocol {
                op: "tables.get",
                target: target.to_string(),
                message: e.to_string(),
            })?;
        let etag = v.get("etag").and_then(|e| e.as_str()).map(str::to_string);
        Ok(Some((etag, v)))
    }

    /// Sends an admin request; returns the status when it is a success or 412, else an error.
    async fn send_admin(
        &self,
        mut req: reqwest::RequestBuilder,
        op: &'static str,
        target: &str,
    ) -> Result<u16, BqError> {
        if let Some(t) = self.options.tokens.token().await.map_err(BqError::Auth)? {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| BqError::Transport {
            op,
            target: target.to_string(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) || status == 412 {
            return Ok(status);
        }
        let body = resp.bytes().await.unwrap_or_default();
        Err(http_error(op, target, status, &body))
    }

    /// One read-only admin call, `op` on `target`: retrying a transient failure (a pooled
    /// connection the server was closing, say) cannot change anything.
    async fn read<T, Fut>(
        &self,
        op: &'static str,
        target: &str,
        call: impl Fn() -> Fut,
    ) -> Result<T, BqError>
    where
        Fut: std::future::Future<Output = Result<T, BQError>>,
    {
        self.options
            .retry
            .run(
                || async { call().await.map_err(|e| admin_error(op, target, e)) },
                |e, n| warn!(attempt = n, error = %e, "bigquery {op} failed, retrying"),
            )
            .await
    }

    /// Runs a standard-SQL query and returns all its rows as cell values, waiting for the
    /// job to complete and reading every page; transient failures are retried.
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<Option<serde_json::Value>>>, BqError> {
        let first = self
            .read("jobs.query", sql, || {
                self.admin
                    .job()
                    .query(&self.options.project, QueryRequest::new(sql))
            })
            .await?;
        let mut rows = first.rows.unwrap_or_default();
        // A job still running after the request's wait answers without rows; a large result
        // comes in pages.
        let mut complete = first.job_complete.unwrap_or(true);
        let mut page_token = first.page_token;
        let job = first.job_reference.unwrap_or_default();
        let deadline = std::time::Instant::now() + QUERY_DEADLINE;
        while !complete || page_token.is_some() {
            let Some(job_id) = job.job_id.as_deref() else {
                return Err(BqError::Protocol {
                    op: "jobs.query",
                    target: sql.to_string(),
                    message: "an incomplete or paged result without a job id".into(),
                });
            };
            if std::time::Instant::now() > deadline {
                return Err(BqError::Transport {
                    op: "jobs.getQueryResults",
                    target: sql.to_string(),
                    message: format!("no result within {QUERY_DEADLINE:?}"),
                });
            }
            let params = GetQueryResultsParameters {
                page_token: page_token.clone(),
                location: job.location.clone(),
                timeout_ms: Some(10_000),
                ..Default::default()
            };
            let r = self
                .read("jobs.getQueryResults", sql, || {
                    self.admin.job().get_query_results(
                        &self.options.project,
                        job_id,
                        params.clone(),
                    )
                })
                .await?;
            if r.job_complete == Some(false) {
                continue;
            }
            complete = true;
            rows.extend(r.rows.unwrap_or_default());
            page_token = r.page_token;
        }
        Ok(rows
            .into_iter()
            .map(|r| {
                r.columns
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| c.value)
                    .collect()
            })
            .collect())
    }

    /// The admin client, for dataset and table operations.
    pub fn admin(&self) -> &gcp_bigquery_client::Client {
        &self.admin
    }
}

/// How long [`BigQuery::query`] waits for a job's result.
const QUERY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// Builds an insertAll body from `rows[start..]` (`(insertId, row JSON)`), as many rows as
/// fit in `max_bytes` (at least one). Returns the end index and the body. Public for the
/// benchmarks; [`BigQuery::insert_all`] is the way to send rows.
pub fn build_body(rows: &[(&str, &[u8])], start: usize, max_bytes: usize) -> (usize, Vec<u8>) {
    const HEAD: &[u8] = b"{\"skipInvalidRows\":true,\"ignoreUnknownValues\":false,\"rows\":[";
    let mut body = Vec::with_capacity(
        HEAD.len()
            + rows[start..]
                .iter()
                .map(|r| r.1.len() + 48)
                .sum::<usize>()
                .min(max_bytes),
    );
    body.extend_from_slice(HEAD);
    let mut end = start;
    for (i, (id, json)) in rows.iter().enumerate().skip(start) {
        let mark = body.len();
        if i > start {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"insertId\":");
        push_str(&mut body, id);
        body.extend_from_slice(b",\"json\":");
        body.extend_from_slice(json);
        body.push(b'}');
        if body.len() + 2 > max_bytes && i > start {
            body.truncate(mark);
            break;
        }
        end = i + 1;
    }
    body.extend_from_slice(b"]}");
    (end, body)
}

fn http_error(op: &'static str, target: &str, status: u16, body: &[u8]) -> BqError {
    let (reason, message) = match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(env) => (
            env.error
                .errors
                .first()
                .map(|e| e.reason.clone())
                .unwrap_or_default(),
            env.error.message,
        ),
        Err(_) => (
            String::new(),
            String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
        ),
    };
    BqError::Http {
        op,
        target: target.to_string(),
        status,
        reason,
        message,
    }
}

fn admin_error(op: &'static str, target: &str, e: BQError) -> BqError {
    match e {
        BQError::ResponseError { error } => BqError::Http {
            op,
            target: target.to_string(),
            status: u16::try_from(error.error.code).unwrap_or(500),
            reason: error
                .error
                .errors
                .first()
                .and_then(|m| m.get("reason").cloned())
                .unwrap_or_default(),
            message: error.error.message,
        },
        BQError::RequestError(e) => BqError::Transport {
            op,
            target: target.to_string(),
            message: e.to_string(),
        },
        BQError::NoToken => BqError::Auth(TokenError::permanent("no access token")),
        other => BqError::Protocol {
            op,
            target: target.to_string(),
            message: other.to_string(),
        },
    }
}

/// A transport error's text, saying so when it was the request timeout (reqwest's own text
/// does not), so that retries are counted with the right reason.
fn transport_message(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("timed out: {e}")
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_whose_protobuf_outgrows_a_request_is_rejected_alone() {
        let schema = ProtoRowSchema::from_table_schema(&serde_json::json!({"fields": [
            {"name": "xs", "type": "INT64", "mode": "REPEATED"}
        ]}))
        .unwrap();
        // ≈ 5 MB of JSON (under the JSON limit), ≈ 11 MB of protobuf: each -1 is a key and a
        // ten-byte varint.
        let n = 1_000_000;
        let mut big = String::from(r#"{"xs":["#);
        big.push_str(&vec![r#""-1""#; n].join(","));
        big.push_str("]}");
        assert!(big.len() < MAX_ROW_BYTES);
        let rows: [&[u8]; 3] = [br#"{"xs":["1"]}"#, big.as_bytes(), br#"{"xs":[]}"#];
        let out = AppendRows::encode(&schema, rows.into_iter());
        assert_eq!(out.index, [0, 2]);
        let rejected = &out.outcome.rejected;
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index, 1);
        assert!(
            rejected[0].message.contains("bytes of protobuf, over the"),
            "{}",
            rejected[0].message
        );
    }

    #[test]
    fn body_is_valid_json_with_insert_ids() {
        let rows: Vec<(&str, &[u8])> = vec![("1", br#"{"a":1}"#), ("2\"", br#"{"a":2}"#)];
        let (end, body) = build_body(&rows, 0, usize::MAX);
        assert_eq!(end, 2);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["skipInvalidRows"], true);
        assert_eq!(v["rows"][1]["insertId"], "2\"");
        assert_eq!(v["rows"][1]["json"]["a"], 2);
    }

    #[test]
    fn body_splits_at_the_byte_limit_but_never_empty() {
        let big = vec![b'x'; 100];
        let row = format!("{{\"s\":\"{}\"}}", String::from_utf8(big).unwrap());
        let rows: Vec<(&str, &[u8])> = (0..10).map(|_| ("id", row.as_bytes())).collect();
        let (end, body) = build_body(&rows, 0, 400);
        assert!(body.len() <= 400, "{}", body.len());
        assert!((1..10).contains(&end), "{end}");
        serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        let (end1, _) = build_body(&rows, 0, 10);
        assert_eq!(end1, 1, "a row larger than the limit is still sent alone");
        let (end2, body2) = build_body(&rows, end, 400);
        assert!(end2 > end);
        serde_json::from_slice::<serde_json::Value>(&body2).unwrap();
    }
}
