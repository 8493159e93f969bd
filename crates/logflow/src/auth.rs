//! Bearer tokens from Application Default Credentials (Workload Identity on GKE), for the REST
//! calls logflow makes itself. Pub/Sub and Storage SDK clients use ADC on their own.

use google_cloud_auth::credentials::{AccessTokenCredentials, Builder};
use logflow_core::auth::BoxFuture;
use logflow_core::{TokenError, TokenProvider};

/// OAuth scope covering BigQuery and Cloud Storage.
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// Tokens from Application Default Credentials; cached and refreshed by the credentials.
#[derive(Debug)]
pub struct AdcTokens(AccessTokenCredentials);

impl AdcTokens {
    /// Finds ADC (metadata server, `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's file).
    pub fn new() -> Result<Self, String> {
        Builder::default()
            .with_scopes([SCOPE])
            .build_access_token_credentials()
            .map(AdcTokens)
            .map_err(|e| format!("Application Default Credentials: {e}"))
    }
}

impl TokenProvider for AdcTokens {
    fn token(&self) -> BoxFuture<'_, Result<Option<String>, TokenError>> {
        Box::pin(async move {
            self.0
                .access_token()
                .await
                .map(|t| Some(t.token))
                .map_err(|e| TokenError {
                    transient: e.is_transient(),
                    message: e.to_string(),
                })
        })
    }
}
