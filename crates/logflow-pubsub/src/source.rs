//! The source task: pull, bound, fan out to the pipeline's branches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{ShutdownBehavior, ShutdownToken};
use logflow_core::{AckHandle, AckPart, Burst, Envelope, Record, RetryPolicy, Stats};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Backoff between re-opens of a failed stream: quick first, capped at 30 s so a worker
/// resumes soon after an outage without hammering the service. Attempts are not bounded:
/// a source never gives up on a transient failure.
const REOPEN_BACKOFF: RetryPolicy = RetryPolicy {
    max_attempts: u32::MAX,
    max_elapsed: Duration::MAX,
    initial_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_secs(30),
};

/// Messages handed to the stages in one send at most. Everything the client has ready (the
/// rest of a StreamingPull response) goes over together: one channel operation and one
/// wake-up of each stage per burst instead of per message.
const MAX_BURST: usize = 256;

/// The flow-control budget the streams of one subscription share.
struct Budget {
    max_bytes: usize,
    messages: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// Source settings of one pipeline.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Full subscription name, `projects/{project}/subscriptions/{id}`.
    pub subscription: String,
    /// Parallel StreamingPull streams (Pub/Sub serves about 10 MB/s per stream).
    pub streams: usize,
    /// Messages held (received, not yet acked or nacked) at most.
    pub max_outstanding_messages: usize,
    /// Payload bytes held at most.
    pub max_outstanding_bytes: usize,
    /// Each lease extension asks for this much time. Short means a crashed worker's messages
    /// come back soon (inside BigQuery's ~1 min insertId dedup window); the client extends
    /// leases of held messages by itself.
    pub lease_extension: Duration,
    /// A message is held at most this long, after which its lease is no longer extended.
    pub max_lease: Duration,
    /// A stream that delivers nothing for this long is re-opened (the stall watchdog): a
    /// stream that hangs without an error must not stop the worker. On a quiet subscription
    /// this is a cheap reconnect now and then.
    pub idle_reopen: Duration,
}

/// Why the source stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The subscription does not exist or cannot be read: an operator must act.
    #[error("pubsub: subscription {subscription}: {message}")]
    Subscription {
        /// The subscription.
        subscription: String,
        /// Detail.
        message: String,
    },
    /// The pipeline's stages are gone (they failed); nothing more can be processed.
    #[error("pubsub: the pipeline stopped accepting messages")]
    PipelineClosed,
    /// The client could not be built.
    #[error("pubsub: client: {0}")]
    Client(String),
}

/// Builds a subscriber: against `emulator_endpoint` (`http://127.0.0.1:8685`) without
/// credentials, or against Pub/Sub with Application Default Credentials.
pub async fn connect(emulator_endpoint: Option<&str>) -> Result<Subscriber, SourceError> {
    let mut b = Subscriber::builder();
    if let Some(ep) = emulator_endpoint {
        b = b
            .with_endpoint(ep)
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    b.build()
        .await
        .map_err(|e| SourceError::Client(e.to_string()))
}

/// Whether a subscription can be pulled from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionCheck {
    /// It exists (and the caller may read its configuration).
    Exists,
    /// Pub/Sub says NOT_FOUND.
    Missing,
    /// Pub/Sub says PERMISSION_DENIED: the message, which names the missing permission.
    Denied(String),
}

/// Asks Pub/Sub for subscription `name` (`projects/P/subscriptions/S`), for start-up checks.
pub async fn check_subscription(
    emulator_endpoint: Option<&str>,
    name: &str,
) -> Result<SubscriptionCheck, SourceError> {
    // One attempt: a start-up check reports, the operator decides.
    let mut b = google_cloud_pubsub::client::SubscriptionAdmin::builder()
        .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
    if let Some(ep) = emulator_endpoint {
        b = b
            .with_endpoint(ep)
            .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build());
    }
    let admin = b
        .build()
        .await
        .map_err(|e| SourceError::Client(e.to_string()))?;
    match admin.get_subscription().set_subscription(name).send().await {
        Ok(_) => Ok(SubscriptionCheck::Exists),
        Err(e) => match e.status().map(|s| s.code) {
            Some(google_cloud_gax::error::rpc::Code::NotFound) => Ok(SubscriptionCheck::Missing),
            Some(google_cloud_gax::error::rpc::Code::PermissionDenied) => {
                Ok(SubscriptionCheck::Denied(e.to_string()))
            }
            _ => Err(SourceError::Client(e.to_string())),
        },
    }
}

/// Streams the messages of one subscription into the pipeline.
#[derive(Debug)]
pub struct PubsubSource {
    client: Subscriber,
    options: SourceOptions,
}

struct PubsubAck {
    handler: Handler,
    stats: Arc<Stats>,
    bytes: u64,
    publish_time_micros: i64,
    received: Instant,
    max_lease: Duration,
    _message: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

impl PubsubAck {
    fn decided(&self) {
        self.stats.release(self.bytes);
        if self.received.elapsed() > self.max_lease {
            self.stats.add(&self.stats.lease_expired, 1);
        }
    }
}

impl AckHandle for PubsubAck {
    fn ack(self) {
        self.decided();
        if self.publish_time_micros > 0 {
            self.stats
                .ack_lag
                .observe_micros(logflow_core::time::now_micros() - self.publish_time_micros);
        }
        let held = self.received.elapsed().as_micros();
        self.stats
            .held_for
            .observe_micros(i64::try_from(held).unwrap_or(i64::MAX));
        self.stats.add(&self.stats.acked, 1);
        self.handler.ack();
    }
    fn nack(self) {
        self.decided();
        self.stats.add(&self.stats.nacked, 1);
        self.handler.nack();
    }
}

impl PubsubSource {
    /// A source on `options.subscription`.
    pub fn new(client: Subscriber, options: SourceOptions) -> Self {
        PubsubSource { client, options }
    }

    /// Pulls until `shutdown` is cancelled, on `options.streams` StreamingPull streams that share
    /// one flow-control budget, sending every message to each of `outputs` with its own ack part,
    /// in bursts of what the streams had ready.
    /// On shutdown, drops the outputs (so the stages drain and flush), then waits for the
    /// outstanding messages to be acked or nacked and for the acks to reach Pub/Sub.
    pub async fn run(
        self,
        outputs: Vec<mpsc::Sender<Burst>>,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let o = &self.options;
        let budget = Budget {
            max_bytes: o.max_outstanding_bytes.clamp(1, u32::MAX as usize),
            messages: Arc::new(Semaphore::new(o.max_outstanding_messages.max(1))),
            bytes: Arc::new(Semaphore::new(
                o.max_outstanding_bytes.clamp(1, u32::MAX as usize),
            )),
        };
        // One failing stream (a permanent error, the pipeline gone) stops the others.
        let stop = shutdown.child_token();
        let loops: Vec<_> = (0..o.streams.max(1))
            .map(|i| {
                self.stream_loop(
                    i,
                    outputs.clone(),
                    &budget,
                    Arc::clone(&stats),
                    stop.clone(),
                )
            })
            .collect();
        drop(outputs);
        let mut result = Ok(());
        let mut tokens = Vec::new();
        for (r, t) in futures::future::join_all(loops).await {
            tokens.extend(t);
            if let Err(e) = r
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        // Every sender is gone now: wait for the held messages to be decided and their acks
        // flushed to Pub/Sub.
        for t in tokens {
            t.shutdown().await;
        }
        info!(subscription = %o.subscription, "source stopped");
        result
    }

    /// One StreamingPull stream, re-opened on failure until `stop`. Returns the shutdown tokens
    /// of the streams it opened; its senders are dropped when it returns.
    async fn stream_loop(
        &self,
        index: usize,
        outputs: Vec<mpsc::Sender<Burst>>,
        budget: &Budget,
        stats: Arc<Stats>,
        stop: CancellationToken,
    ) -> (Result<(), SourceError>, Vec<ShutdownToken>) {
        let mut bursts = Bursts::new(outputs, Arc::clone(&stats));
        let result = self.pull(index, &mut bursts, budget, &stats, &stop).await;
        // What was gathered when the loop stopped still goes out (on shutdown the stages
        // drain it); if a stage is gone, dropping it nacks it.
        let result = match (result, bursts.flush().await) {
            ((Ok(()), t), Err(e)) => (Err(e), t),
            (r, _) => r,
        };
        if result.0.is_err() {
            stop.cancel();
        }
        result
    }

    async fn pull(
        &self,
        index: usize,
        bursts: &mut Bursts,
        budget: &Budget,
        stats: &Arc<Stats>,
        stop: &CancellationToken,
    ) -> (Result<(), SourceError>, Vec<ShutdownToken>) {
        let o = &self.options;
        let mut failures = 0u32;
        // The watchdog's period doubles with each idle re-open and resets when a message
        // arrives: re-opening faster than a slow server delivers would churn, as a cancelled
        // stream keeps the messages assigned to it until their deadline. It grows to 8× the
        // setting, and at least to twice the stream's ack deadline, so that a stream lives long
        // enough to receive what a cancelled one stranded.
        let mut idle = o.idle_reopen;
        let max_idle = (o.idle_reopen * 8).max(o.lease_extension * 2);
        let mut tokens = Vec::new();
        let result = 'streams: loop {
            // Pub/Sub applies these limits per stream: each stream asks for its share of the
            // worker's budget, so that the server never sends more than the worker will read
            // at once (unread messages are not leased, and would expire and come back).
            let streams = o.streams.max(1);
            let mut stream = self
                .client
                .subscribe(o.subscription.clone())
                .set_max_outstanding_messages(o.max_outstanding_messages.div_ceil(streams) as i64)
                .set_max_outstanding_bytes(budget.max_bytes.div_ceil(streams) as i64)
                .set_max_lease_extension(o.lease_extension)
                .set_max_lease(o.max_lease)
                .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
                .build();
            // The streams opened before this one are dropped (which shuts them down): keep
            // only the tokens of those still settling their messages, so that a worker
            // re-opening idle streams for weeks does not accumulate them.
            tokens.retain(|t: &ShutdownToken| t.shutdown().now_or_never().is_none());
            tokens.push(stream.shutdown_token());
            info!(subscription = %o.subscription, stream = index, "streaming pull opened");
            loop {
                // Waiting (on the budget or on Pub/Sub) first hands over what was gathered.
                let message_permit = match permit(&budget.messages, 1, bursts, stop).await {
                    Ok(Some(p)) => p,
                    Ok(None) => break 'streams Ok(()),
                    Err(e) => break 'streams Err(e),
                };
                // `MessageStream::next` is cancel-safe: a poll that finds nothing ready takes
                // nothing out of the stream.
                let ready = if bursts.is_empty() || bursts.is_full() || stop.is_cancelled() {
                    None
                } else {
                    stream.next().now_or_never()
                };
                let next = match ready {
                    Some(n) => n,
                    None => {
                        if let Err(e) = bursts.flush().await {
                            break 'streams Err(e);
                        }
                        tokio::select! {
                            _ = stop.cancelled() => break 'streams Ok(()),
                            n = tokio::time::timeout(idle, stream.next()) => match n {
                                Ok(n) => n,
                                Err(_) => {
                                    stats.add(&stats.stream_reopens, 1);
                                    info!(subscription = %o.subscription, stream = index, idle = ?idle, "no message for a while, re-opening the stream");
                                    idle = (idle * 2).min(max_idle);
                                    continue 'streams;
                                }
                            },
                        }
                    }
                };
                let (msg, handler) = match next {
                    Some(Ok(pair)) => pair,
                    Some(Err(e)) => {
                        let permanent = e.status().is_some_and(|s| {
                            matches!(
                                s.code,
                                Code::NotFound | Code::PermissionDenied | Code::Unauthenticated
                            )
                        });
                        if permanent {
                            break 'streams Err(SourceError::Subscription {
                                subscription: o.subscription.clone(),
                                message: e.to_string(),
                            });
                        }
                        failures += 1;
                        stats.add(&stats.stream_reopens, 1);
                        stats.add(&stats.stream_failures_in_a_row, 1);
                        let wait = REOPEN_BACKOFF.jittered_backoff(failures);
                        // Not holding what was gathered through the backoff.
                        if let Err(e) = bursts.flush().await {
                            break 'streams Err(e);
                        }
                        warn!(subscription = %o.subscription, stream = index, error = %e, retry_in = ?wait, "streaming pull failed, re-opening");
                        tokio::select! {
                            _ = stop.cancelled() => break 'streams Ok(()),
                            _ = tokio::time::sleep(wait) => continue 'streams,
                        }
                    }
                    None => {
                        stats.add(&stats.stream_reopens, 1);
                        warn!(subscription = %o.subscription, stream = index, "streaming pull ended, re-opening");
                        continue 'streams;
                    }
                };
                if failures > 0 {
                    stats
                        .stream_failures_in_a_row
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                }
                failures = 0;
                idle = o.idle_reopen;
                let size = msg.data.len()
                    + msg
                        .attributes
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>();
                // A message larger than the byte budget takes all of it, and waits for it.
                let need = size.clamp(1, budget.max_bytes) as u32;
                let bytes_permit = match permit(&budget.bytes, need, bursts, stop).await {
                    Ok(Some(p)) => p,
                    Ok(None) => break 'streams Ok(()),
                    Err(e) => break 'streams Err(e),
                };
                let record = Arc::new(to_record(msg, handler.delivery_attempt()));
                stats.add(&stats.received, 1);
                if record.delivery_attempt.is_some_and(|a| a > 1) {
                    stats.add(&stats.redelivered, 1);
                }
                stats.hold(size as u64);
                let ack = PubsubAck {
                    handler,
                    stats: Arc::clone(stats),
                    bytes: size as u64,
                    publish_time_micros: record.publish_time_micros,
                    received: Instant::now(),
                    max_lease: o.max_lease,
                    _message: message_permit,
                    _bytes: bytes_permit,
                };
                bursts.push(record, ack);
            }
        };
        (result, tokens)
    }
}

/// `n` permits of `budget`: at once if they are free, else after handing over what was
/// gathered (the stages free permits as they finish with messages), waiting until they are
/// free or `stop` (`None`).
async fn permit(
    budget: &Arc<Semaphore>,
    n: u32,
    bursts: &mut Bursts,
    stop: &CancellationToken,
) -> Result<Option<OwnedSemaphorePermit>, SourceError> {
    if let Ok(p) = Arc::clone(budget).try_acquire_many_owned(n) {
        return Ok(Some(p));
    }
    bursts.flush().await?;
    Ok(tokio::select! {
        _ = stop.cancelled() => None,
        p = Arc::clone(budget).acquire_many_owned(n) => Some(p.expect("semaphore never closed")),
    })
}

/// One burst per output, gathered while the streams have messages ready.
struct Bursts {
    outputs: Vec<mpsc::Sender<Burst>>,
    pending: Vec<Burst>,
    stats: Arc<Stats>,
}

impl Bursts {
    fn new(outputs: Vec<mpsc::Sender<Burst>>, stats: Arc<Stats>) -> Self {
        let pending = outputs.iter().map(|_| Vec::new()).collect();
        Bursts {
            outputs,
            pending,
            stats,
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.first().is_none_or(Vec::is_empty)
    }

    fn is_full(&self) -> bool {
        self.pending.first().is_some_and(|b| b.len() >= MAX_BURST)
    }

    /// Adds a message for every output, each with its own ack part: the message is acked when
    /// every output made it durable.
    fn push(&mut self, record: Arc<Record>, ack: PubsubAck) {
        let parts = AckPart::split_n(ack, self.outputs.len());
        for (burst, part) in self.pending.iter_mut().zip(parts) {
            burst.push(Envelope {
                record: Arc::clone(&record),
                ack: part,
            });
        }
    }

    /// Sends what was gathered.
    async fn flush(&mut self) -> Result<(), SourceError> {
        if self.is_empty() {
            return Ok(());
        }
        self.stats
            .source_burst
            .observe_count(self.pending[0].len() as u64);
        for (out, burst) in self.outputs.iter().zip(&mut self.pending) {
            let burst = std::mem::replace(burst, Vec::with_capacity(16));
            if out.send(burst).await.is_err() {
                return Err(SourceError::PipelineClosed);
            }
        }
        Ok(())
    }
}

fn to_record(msg: google_cloud_pubsub::model::Message, delivery_attempt: Option<i32>) -> Record {
    let publish_time_micros = msg
        .publish_time
        .map(|t| t.seconds() * 1_000_000 + i64::from(t.nanos() / 1000))
        .unwrap_or(0);
    let mut attributes: Vec<(String, String)> = msg.attributes.into_iter().collect();
    attributes.sort_unstable();
    Record {
        message_id: msg.message_id,
        publish_time_micros,
        attributes,
        ordering_key: msg.ordering_key,
        data: msg.data,
        delivery_attempt,
    }
}
