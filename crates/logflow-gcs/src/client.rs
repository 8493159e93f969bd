//! The object client: whole-object writes that never overwrite, listing through the JSON API
//! (which real GCS and the emulators both serve; the SDK lists over gRPC only), and reads.

use std::sync::Arc;

use bytes::Bytes;
use google_cloud_gax::retry_policy::NeverRetry;
use google_cloud_storage::client::Storage;
use logflow_core::{RetryPolicy, Stats, TokenError, TokenProvider};
use serde::Deserialize;
use tracing::warn;

use crate::error::GcsError;

const GCS_JSON_API: &str = "https://storage.googleapis.com";
/// Objects are uploaded in one request up to this size (resumable uploads would add round trips,
/// and hang against the emulators). Batches are bounded well below it by configuration.
const SINGLE_SHOT_LIMIT: usize = 1 << 30;

/// How to reach GCS.
#[derive(Debug, Clone)]
pub struct GcsOptions {
    /// Emulator base URL (`http://127.0.0.1:4443`); `None` for real GCS with ADC.
    pub emulator_endpoint: Option<String>,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Bearer tokens for the JSON API calls.
    pub tokens: Arc<dyn TokenProvider>,
    /// Bound on one attempt of any request (a hung connection becomes a transient error).
    pub request_timeout: std::time::Duration,
}

/// A listed object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ObjectInfo {
    /// Object name.
    pub name: String,
    /// Size in bytes (the JSON API sends it as a decimal string).
    #[serde(deserialize_with = "de_u64_string")]
    pub size: u64,
}

fn de_u64_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListPage {
    #[serde(default)]
    items: Vec<ObjectInfo>,
    next_page_token: Option<String>,
}

/// GCS client shared by the archive and dead-letter writers of every pipeline.
#[derive(Debug, Clone)]
pub struct Gcs {
    storage: Storage,
    http: reqwest::Client,
    json_api: String,
    options: GcsOptions,
}

impl Gcs {
    /// Builds the client. Against real GCS the SDK uses Application Default Credentials.
    pub async fn new(options: GcsOptions) -> Result<Self, GcsError> {
        let mut builder = Storage::builder()
            .with_retry_policy(NeverRetry)
            .with_resumable_upload_threshold(SINGLE_SHOT_LIMIT);
        if let Some(ep) = &options.emulator_endpoint {
            builder = builder.with_endpoint(ep.clone()).with_credentials(
                google_cloud_auth::credentials::anonymous::Builder::new().build(),
            );
        }
        let storage = builder
            .build()
            .await
            .map_err(|e| GcsError::Auth(TokenError::permanent(e.to_string())))?;
        let json_api = options
            .emulator_endpoint
            .clone()
            .unwrap_or_else(|| GCS_JSON_API.to_string());
        let http = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| GcsError::Auth(TokenError::permanent(e.to_string())))?;
        Ok(Gcs {
            storage,
            http,
            json_api,
            options,
        })
    }

    /// Writes a new object in one request with `ifGenerationMatch=0`, retrying transient
    /// failures. A 412 on a retry means an earlier attempt of ours landed: success. A 412 on the
    /// first attempt means the name is taken: a permanent error (names are unique per worker).
    pub async fn put_new(
        &self,
        bucket: &str,
        name: &str,
        data: Bytes,
        content_type: &'static str,
        stats: &Stats,
    ) -> Result<(), GcsError> {
        let mut attempt = 0u32;
        self.options
            .retry
            .run(
                || {
                    attempt += 1;
                    let data = data.clone();
                    let first = attempt == 1;
                    async move {
                        let put = self.put_once(bucket, name, data, content_type);
                        match self.bounded("put", bucket, name, put).await {
                            Err(GcsError::Http { status: 412, .. }) if !first => Ok(()),
                            other => other,
                        }
                    }
                },
                |e, n| {
                    stats.add_retry("gcs", e.retry_reason());
                    warn!(bucket, object = name, attempt = n, error = %e, "gcs write failed, retrying");
                },
            )
            .await
    }

    async fn put_once(
        &self,
        bucket: &str,
        name: &str,
        data: Bytes,
        content_type: &'static str,
    ) -> Result<(), GcsError> {
        self.storage
            .write_object(format!("projects/_/buckets/{bucket}"), name, data)
            .set_if_generation_match(0)
            .set_content_type(content_type)
            .send_buffered()
            .await
            .map(|_| ())
            .map_err(|e| sdk_error("put", bucket, name, &e))
    }

    /// Reads a whole object, retrying transient failures.
    pub async fn get(&self, bucket: &str, name: &str) -> Result<Bytes, GcsError> {
        self.options
            .retry
            .run(
                || self.bounded("get", bucket, name, self.get_once(bucket, name)),
                |e, n| warn!(bucket, object = name, attempt = n, error = %e, "gcs read failed, retrying"),
            )
            .await
    }

    /// One attempt, bounded by the request timeout: the SDK's writes and reads have no
    /// attempt timeout of their own, and a connection that hangs must not hold a batch forever.
    async fn bounded<T>(
        &self,
        op: &'static str,
        bucket: &str,
        name: &str,
        attempt: impl std::future::Future<Output = Result<T, GcsError>>,
    ) -> Result<T, GcsError> {
        tokio::time::timeout(self.options.request_timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(GcsError::Transport {
                    op,
                    bucket: bucket.to_string(),
                    object: name.to_string(),
                    message: format!(
                        "no answer within {:?} (request_timeout)",
                        self.options.request_timeout
                    ),
                })
            })
    }

    async fn get_once(&self, bucket: &str, name: &str) -> Result<Bytes, GcsError> {
        let mut resp = self
            .storage
            .read_object(format!("projects/_/buckets/{bucket}"), name)
            .send()
            .await
            .map_err(|e| sdk_error("get", bucket, name, &e))?;
        let mut out = Vec::new();
        while let Some(chunk) = resp.next().await {
            out.extend_from_slice(&chunk.map_err(|e| sdk_error("get", bucket, name, &e))?);
        }
        Ok(Bytes::from(out))
    }

    /// Checks that `bucket` exists and can be read (`GET /storage/v1/b/{bucket}`).
    pub async fn check_bucket(&self, bucket: &str) -> Result<(), GcsError> {
        let url = format!("{}/storage/v1/b/{bucket}", self.json_api);
        let mut req = self.http.get(&url);
        if let Some(token) = self.options.tokens.token().await.map_err(GcsError::Auth)? {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(|e| GcsError::Transport {
            op: "get bucket",
            bucket: bucket.to_string(),
            object: String::new(),
            message: e.to_string(),
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        Err(GcsError::Http {
            op: "get bucket",
            bucket: bucket.to_string(),
            object: String::new(),
            status: status.as_u16(),
            message: resp.text().await.unwrap_or_default(),
        })
    }

    /// Lists every object under `prefix`, following page tokens (1,000 objects per page, GCS's
    /// maximum), retrying each page on transient failures.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectInfo>, GcsError> {
        let mut out = Vec::new();
        let mut page_token: Option<String> = None;
        loop {
            let page = self
                .options
                .retry
                .run(
                    || self.list_page(bucket, prefix, page_token.as_deref()),
                    |e, n| warn!(bucket, prefix, attempt = n, error = %e, "gcs listing failed, retrying"),
                )
                .await?;
            out.extend(page.items);
            match page.next_page_token {
                Some(t) if !t.is_empty() => page_token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        page_token: Option<&str>,
    ) -> Result<ListPage, GcsError> {
        let url = format!("{}/storage/v1/b/{bucket}/o", self.json_api);
        let mut req = self.http.get(&url).query(&[
            ("prefix", prefix),
            ("maxResults", "1000"),
            ("fields", "items(name,size),nextPageToken"),
        ]);
        if let Some(t) = page_token {
            req = req.query(&[("pageToken", t)]);
        }
        if let Some(token) = self.options.tokens.token().await.map_err(GcsError::Auth)? {
            req = req.bearer_auth(token);
        }
        let transport = |e: reqwest::Error| GcsError::Transport {
            op: "list",
            bucket: bucket.to_string(),
            object: prefix.to_string(),
            message: e.to_string(),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(GcsError::Http {
                op: "list",
                bucket: bucket.to_string(),
                object: prefix.to_string(),
                status: status.as_u16(),
                message: resp.text().await.unwrap_or_default(),
            });
        }
        resp.json().await.map_err(transport)
    }
}

fn sdk_error(
    op: &'static str,
    bucket: &str,
    object: &str,
    e: &google_cloud_storage::Error,
) -> GcsError {
    if let Some(status) = e.http_status_code() {
        return GcsError::Http {
            op,
            bucket: bucket.to_string(),
            object: object.to_string(),
            status,
            message: e.to_string(),
        };
    }
    // A credentials failure the library marks transient (the metadata server busy, a token
    // refresh that timed out) is retried; other ones are permanent.
    if e.is_authentication() {
        let transient = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_some_and(|c| c.is_transient());
        return GcsError::Auth(TokenError {
            message: e.to_string(),
            transient,
        });
    }
    GcsError::Transport {
        op,
        bucket: bucket.to_string(),
        object: object.to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use google_cloud_gax::error::CredentialsError;
    use logflow_core::{Classify as _, ErrorClass};

    #[test]
    fn a_credentials_failure_is_retried_only_when_the_library_calls_it_transient() {
        let class = |transient| {
            let e = google_cloud_storage::Error::authentication(CredentialsError::from_msg(
                transient,
                "metadata server",
            ));
            sdk_error("upload", "b", "o", &e).class()
        };
        assert_eq!(class(true), ErrorClass::Transient);
        assert_eq!(class(false), ErrorClass::Permanent);
    }
}
