//! Helpers for the end-to-end tests against the three emulators that `make test` starts.
//!
//! Each test makes its own topics, subscriptions, buckets and dataset (unique names), so tests
//! share the emulators but not their data.

pub mod outputs;
pub mod private;
pub mod proxy;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use logflow::endpoints::Endpoints;
use serde_json::json;

/// The emulators, as named by the environment that `make test` sets.
#[derive(Debug, Clone)]
pub struct Emulators {
    /// Endpoints for the worker.
    pub endpoints: Endpoints,
    /// Project.
    pub project: String,
    http: reqwest::Client,
}

impl Emulators {
    /// Reads the emulator variables; panics with the fix when they are missing.
    pub fn from_env() -> Self {
        logflow::install_crypto_provider();
        let endpoints = Endpoints::from_env();
        assert!(
            endpoints.pubsub.is_some()
                && endpoints.storage.is_some()
                && endpoints.bigquery.is_some()
                && endpoints.bigquery_storage.is_some(),
            "PUBSUB_EMULATOR_HOST, STORAGE_EMULATOR_HOST, BIGQUERY_EMULATOR_HOST and \
             BIGQUERY_STORAGE_EMULATOR_HOST must be set: \
             run these tests with `make test`, which starts the emulators"
        );
        let project =
            std::env::var("LOGFLOW_PROJECT").unwrap_or_else(|_| "test-project".to_string());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client");
        Emulators {
            endpoints,
            project,
            http,
        }
    }

    fn pubsub(&self) -> String {
        format!(
            "{}/v1/projects/{}",
            self.endpoints.pubsub.as_deref().unwrap_or_default(),
            self.project
        )
    }

    async fn call(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let resp = req.send().await.with_context(|| what.to_string())?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{what}: HTTP {status}: {text}");
        }
        Ok(if text.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text)?
        })
    }

    /// Creates a topic and a subscription on it (10 s ack deadline); returns the topic path.
    pub async fn topic_and_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> anyhow::Result<String> {
        let base = self.pubsub();
        self.call(
            self.http.put(format!("{base}/topics/{topic}")),
            "create topic",
        )
        .await?;
        let body = json!({"topic": format!("projects/{}/topics/{topic}", self.project), "ackDeadlineSeconds": 10});
        self.call(
            self.http
                .put(format!("{base}/subscriptions/{subscription}"))
                .json(&body),
            "create subscription",
        )
        .await?;
        Ok(format!("projects/{}/topics/{topic}", self.project))
    }

    /// A fresh topic `{prefix}-…` and its subscription `{topic}-sub`: (topic id, subscription
    /// id, topic path).
    pub async fn fresh_topic(&self, prefix: &str) -> anyhow::Result<(String, String, String)> {
        let topic = unique(prefix);
        let subscription = format!("{topic}-sub");
        let path = self.topic_and_subscription(&topic, &subscription).await?;
        Ok((topic, subscription, path))
    }

    /// Deletes a subscription and its topic (the emulator keeps every message in memory).
    pub async fn delete_topic_and_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> anyhow::Result<()> {
        let base = self.pubsub();
        self.call(
            self.http
                .delete(format!("{base}/subscriptions/{subscription}")),
            "delete subscription",
        )
        .await?;
        self.call(
            self.http.delete(format!("{base}/topics/{topic}")),
            "delete topic",
        )
        .await
        .map(|_| ())
    }

    /// Messages a pull can get right now from `subscription` (they are not acked).
    pub async fn pullable(&self, subscription: &str) -> anyhow::Result<usize> {
        let url = format!("{}/subscriptions/{subscription}:pull", self.pubsub());
        let v = self
            .call(
                self.http
                    .post(url)
                    .json(&json!({"maxMessages": 1000, "returnImmediately": true})),
                "pull",
            )
            .await?;
        Ok(v["receivedMessages"].as_array().map_or(0, Vec::len))
    }

    /// Creates a bucket.
    pub async fn bucket(&self, name: &str) -> anyhow::Result<()> {
        let url = format!(
            "{}/storage/v1/b?project={}",
            self.endpoints.storage.as_deref().unwrap_or_default(),
            self.project
        );
        self.call(
            self.http.post(url).json(&json!({"name": name})),
            "create bucket",
        )
        .await
        .map(|_| ())
    }

    /// Deletes an empty bucket.
    pub async fn delete_bucket(&self, name: &str) -> anyhow::Result<()> {
        let url = format!(
            "{}/storage/v1/b/{name}",
            self.endpoints.storage.as_deref().unwrap_or_default()
        );
        self.call(self.http.delete(url), "delete bucket")
            .await
            .map(|_| ())
    }

    /// Creates a dataset.
    pub async fn dataset(&self, name: &str) -> anyhow::Result<()> {
        let url = format!(
            "{}/bigquery/v2/projects/{}/datasets",
            self.endpoints.bigquery.as_deref().unwrap_or_default(),
            self.project
        );
        let body = json!({"datasetReference": {"projectId": self.project, "datasetId": name}});
        self.call(self.http.post(url).json(&body), "create dataset")
            .await
            .map(|_| ())
    }

    /// Creates a table with an explicit schema (`{"fields": [...]}`).
    pub async fn table(
        &self,
        dataset: &str,
        table: &str,
        schema: serde_json::Value,
    ) -> anyhow::Result<()> {
        let url = format!(
            "{}/bigquery/v2/projects/{}/datasets/{dataset}/tables",
            self.endpoints.bigquery.as_deref().unwrap_or_default(),
            self.project
        );
        let body = json!({
            "tableReference": {"projectId": self.project, "datasetId": dataset, "tableId": table},
            "schema": schema,
        });
        self.call(self.http.post(url).json(&body), "create table")
            .await
            .map(|_| ())
    }

    /// The table resource (tables.get).
    pub async fn table_resource(
        &self,
        dataset: &str,
        table: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!(
            "{}/bigquery/v2/projects/{}/datasets/{dataset}/tables/{table}",
            self.endpoints.bigquery.as_deref().unwrap_or_default(),
            self.project
        );
        self.call(self.http.get(url), "get table").await
    }
}

/// A name unique to this test run: `{prefix}-{random}` (lower case, valid everywhere).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// The repository's `schemas/` directory.
pub fn schemas_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas")
        .canonicalize()
        .expect("schemas dir")
}
