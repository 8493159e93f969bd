//! Publishing payloads to a topic (the load generator and the tests use it).

use anyhow::Context as _;
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;

/// Futures awaited together: enough to fill the publisher's batches, bounded in memory.
const IN_FLIGHT: usize = 1000;

/// A publisher on `topic` (`projects/P/topics/T`), against the emulator when `emulator` is set.
pub async fn publisher(topic: &str, emulator: Option<&str>) -> anyhow::Result<Publisher> {
    let mut b = Publisher::builder(topic.to_string());
    if let Some(ep) = emulator {
        b = b
            .with_endpoint(ep)
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    b.build()
        .await
        .with_context(|| format!("publisher for {topic}"))
}

/// Publishes every payload with its attributes; returns the message ids, in order.
pub async fn publish_all(
    publisher: &Publisher,
    items: impl IntoIterator<Item = (Vec<u8>, Vec<(String, String)>)>,
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut pending = Vec::with_capacity(IN_FLIGHT);
    for (data, attributes) in items {
        pending.push(publisher.publish(Message::new().set_data(data).set_attributes(attributes)));
        if pending.len() == IN_FLIGHT {
            for r in futures::future::join_all(pending.drain(..)).await {
                ids.push(r.context("publish")?);
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        ids.push(r.context("publish")?);
    }
    Ok(ids)
}
