//! Collects every problem with a request body at once, each located by a JSON pointer (RFC 6901),
//! so a CI user fixes a spec in one round trip instead of one error at a time.
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// JSON pointer to the offending value, e.g. `/pipeline/0/granularity`.
    #[schema(example = "/pipeline/0/stage")]
    pub pointer: String,
    /// A sentence for a person.
    #[schema(example = "unknown stage `quantise`; expected one of: evaluate")]
    pub detail: String,
}

/// Accumulates [`FieldError`]s while walking a JSON document.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<FieldError>);

impl Problems {
    pub fn add(&mut self, pointer: impl Into<String>, detail: impl Into<String>) {
        self.0.push(FieldError {
            pointer: pointer.into(),
            detail: detail.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result<T>(self, value: T) -> Result<T, Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }
}

/// Escapes a key for use inside a JSON pointer.
pub fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}
