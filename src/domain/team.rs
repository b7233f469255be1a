//! Teams: projects, API keys and their roles, quotas. What the HTTP API and `shrink admin` share.
use super::validation::{Checker, Validate};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The project the first admin key belongs to, and where rows created before projects existed live.
pub use super::ids::DEFAULT_PROJECT;

/// Every API key starts with this, so that secret scanners and people recognise one.
pub const KEY_PREFIX: &str = "shrk_";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read only, in its project.
    Viewer,
    /// Read and write in its project.
    Member,
    /// Everything a member may do in its project, plus managing every project, key and quota.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Member, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Member => "member",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn can_write(self) -> bool {
        self >= Role::Member
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Limits an admin sets per project; `null` (or absent) is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Bytes of models, datasets and job artifacts the project may keep.
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integral")]
    pub max_stored_bytes: Option<i64>,
    /// Jobs waiting in the queue at once; more are refused with 429.
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integral")]
    pub max_queued_jobs: Option<i64>,
    /// Jobs running at once; more wait in the queue.
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integral")]
    pub max_running_jobs: Option<i64>,
    /// The largest single upload (also bounded by the server's own limit).
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integral")]
    pub max_upload_bytes: Option<i64>,
}

/// An optional whole number, also written as a float with no fraction (`5.0`): JSON Schema's
/// `integer` allows both, so clients generated from the document may send either.
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i));
            }
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                _ => Err(D::Error::custom(format!(
                    "expected a whole number of at most 9e15, got {n}"
                ))),
            }
        }
    }
}

impl Validate for Quotas {
    fn validate(&self, c: &mut Checker<'_>) {
        for (name, value) in [
            ("max_stored_bytes", self.max_stored_bytes),
            ("max_queued_jobs", self.max_queued_jobs),
            ("max_running_jobs", self.max_running_jobs),
            ("max_upload_bytes", self.max_upload_bytes),
        ] {
            c.check(
                name,
                value.is_none_or(|v| v >= 0),
                format!("`{name}` must be 0 or more (or null for no limit)"),
            );
        }
    }
}

/// `POST /projects`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    /// Lowercase letters, digits and `-` (1 to 63), not starting with `-`.
    #[schema(
        example = "vision",
        pattern = "^[a-z0-9][a-z0-9-]{0,62}$",
        min_length = 1,
        max_length = 63
    )]
    pub id: String,
    /// A display name; defaults to the id.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub name: Option<String>,
    #[serde(default)]
    pub quotas: Quotas,
}

impl Validate for NewProject {
    fn validate(&self, c: &mut Checker<'_>) {
        if let Err(e) = check_project_id(&self.id) {
            c.add("id", e);
        }
        if let Some(name) = &self.name {
            if let Err(e) = check_name("name", name) {
                c.add("name", e);
            }
        }
        c.nested("quotas", &self.quotas);
    }
}

/// `POST /projects/{id}/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// What the key is for, e.g. `ci` or `dashboard`.
    #[schema(
        example = "ci",
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub name: String,
    pub role: Role,
}

impl Validate for NewKey {
    fn validate(&self, c: &mut Checker<'_>) {
        if let Err(e) = check_name("name", &self.name) {
            c.add("name", e);
        }
    }
}

/// What a project holds and runs right now, counted against its quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub stored_bytes: i64,
    pub queued_jobs: i64,
    pub running_jobs: i64,
}

/// A team's space: its models, datasets, jobs and keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Project {
    /// Lowercase letters, digits and `-`; chosen at creation, part of every object key.
    #[schema(example = "vision")]
    pub id: String,
    pub name: String,
    pub quotas: Quotas,
    pub usage: Usage,
    pub created_at: DateTime<Utc>,
}

/// An API key as listed: never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub project: String,
    pub name: String,
    pub role: Role,
    /// The key's first characters (`shrk_` and 8 more), to recognise it.
    #[schema(example = "shrk_3fa85f64")]
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    /// To the minute; `null` when never used.
    pub last_used_at: Option<DateTime<Utc>>,
    /// Set once the key is revoked; a revoked key gets 401.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key just created: the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: ApiKey,
    /// Send as `Authorization: Bearer <secret>`. Stored only as a hash: it cannot be shown again.
    #[schema(example = "shrk_3fa85f64b1c94c3f9d8e2a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d")]
    pub secret: String,
}

/// Checks a project id: 1 to 63 of `a-z`, `0-9`, `-`, starting with a letter or digit.
pub fn check_project_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not a project id: use 1 to 63 lowercase letters, digits and `-`, not starting with `-`"
        ))
    }
}

/// Checks a key's (or project's) display name: 1 to 200 characters.
pub fn check_name(field: &str, name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if (1..=200).contains(&n) && !name.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(format!(
            "`{field}` must be 1 to 200 characters without control characters"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids_are_safe_in_object_keys() {
        assert!(check_project_id("vision-2").is_ok());
        for bad in ["", "-x", "A", "a/b", "../x", "a b", &"x".repeat(64)] {
            assert!(check_project_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn roles_order_by_power() {
        assert!(!Role::Viewer.can_write());
        assert!(Role::Member.can_write() && Role::Admin.can_write());
        assert_eq!(Role::parse("member"), Some(Role::Member));
        assert_eq!(Role::parse("owner"), None);
    }

    #[test]
    fn negative_quotas_are_named() {
        let errors = crate::domain::validation::parse::<NewProject>(
            &serde_json::json!({"id": "x", "quotas": {"max_queued_jobs": -1}}),
        )
        .unwrap_err();
        assert_eq!(errors[0].pointer, "/quotas/max_queued_jobs");
    }

    #[test]
    fn a_bad_role_is_one_problem_at_the_role() {
        let errors = crate::domain::validation::parse::<NewKey>(
            &serde_json::json!({"name": "x", "role": "owner"}),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].pointer, "/role");
    }

    #[test]
    fn whole_numbers_written_as_floats_are_accepted_and_fractions_named() {
        let q: Quotas = crate::domain::validation::parse(
            &serde_json::json!({"max_stored_bytes": 5.0, "max_queued_jobs": 3}),
        )
        .unwrap();
        assert_eq!((q.max_stored_bytes, q.max_queued_jobs), (Some(5), Some(3)));
        let errors = crate::domain::validation::parse::<Quotas>(
            &serde_json::json!({"max_running_jobs": 1.5, "other": 1}),
        )
        .unwrap_err();
        let pointers: Vec<&str> = errors.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, ["/max_running_jobs", "/other"], "{errors:?}");
    }
}
