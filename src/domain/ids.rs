//! Typed identifiers. UUIDv7 keeps ids sortable by creation time, which the cursor pagination uses.
use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

macro_rules! id_type {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            /// Parses the textual form; `None` when it is not a UUID.
            pub fn parse(s: &str) -> Option<Self> {
                Uuid::parse_str(s).ok().map(Self)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(ModelId, "Identifies an uploaded model.");
id_type!(DatasetId, "Identifies an uploaded dataset.");
id_type!(JobId, "Identifies an optimization job.");

/// The project (team) every row belongs to. Until authentication lands, everything is in `default`.
pub const DEFAULT_PROJECT: &str = "default";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_created_later_sort_later() {
        let a = JobId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = JobId::new();
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn a_non_uuid_is_not_an_id() {
        assert!(ModelId::parse("../etc/passwd").is_none());
    }
}
