//! Access tokens for the REST calls logflow makes itself (BigQuery insertAll, GCS listing),
//! without tying the connectors to a credentials library: the binary supplies the provider.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Supplies OAuth2 bearer tokens; `None` means send no `Authorization` header (emulators).
pub trait TokenProvider: Send + Sync + Debug {
    /// A currently valid token. Implementations cache and refresh as needed.
    fn token(&self) -> BoxFuture<'_, Result<Option<String>, TokenError>>;
}

/// No token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TokenError {
    /// What failed.
    pub message: String,
    /// Asking again may succeed (the metadata server busy, a refresh that timed out); else
    /// the credentials themselves are wrong or missing.
    pub transient: bool,
}

impl TokenError {
    /// A failure that asking again will not fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        TokenError {
            message: message.into(),
            transient: false,
        }
    }
}

/// No credentials: for the local emulators.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoAuth;

impl TokenProvider for NoAuth {
    fn token(&self) -> BoxFuture<'_, Result<Option<String>, TokenError>> {
        Box::pin(async { Ok(None) })
    }
}
