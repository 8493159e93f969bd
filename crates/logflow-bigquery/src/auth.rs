//! Bridges logflow's [`TokenProvider`] to gcp-bigquery-client's `Authenticator`, so one
//! credentials source serves both the admin calls and the insertAll requests.

use std::sync::Arc;

use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use logflow_core::TokenProvider;

/// An `Authenticator` backed by a [`TokenProvider`].
#[derive(Debug, Clone)]
pub struct BqAuthenticator(pub Arc<dyn TokenProvider>);

#[async_trait::async_trait]
impl Authenticator for BqAuthenticator {
    async fn access_token(&self) -> Result<String, BQError> {
        // The emulator accepts any bearer token; real BigQuery gets the provider's.
        match self.0.token().await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Ok("emulator".to_string()),
            Err(_) => Err(BQError::NoToken),
        }
    }
}
