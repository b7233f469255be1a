//! Parses a request body into its typed struct and reports every problem at once, each located
//! by a JSON pointer (RFC 6901), so a CI user fixes a spec in one round trip.
//!
//! The serde types are the only definition of the options: [`parse`] reads names, types and
//! defaults from them, and a type's [`Validate`] impl adds the value checks serde cannot express.
//! - **Wrong types** come from serde (with `serde_path_to_error` for the pointer). Where serde
//!   cannot say which key failed (internally tagged enums and `flatten` buffer their input), the
//!   key is found by removing keys until the error changes. The bad key is then dropped and the
//!   parse repeated, so every type error is reported, not only the first.
//! - **Unknown keys** are those that do not come back when the typed value is serialized again:
//!   no hand-kept list of field names can drift from the struct.
//! - **Out-of-range values and options that contradict each other** are checked on the typed
//!   value by [`Validate`].
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// JSON pointer to the offending value, e.g. `/pipeline/0/granularity`.
    #[schema(example = "/pipeline/0/stage")]
    pub pointer: String,
    /// A sentence for a person.
    #[schema(
        example = "unknown value `quantise`; expected one of: evaluate, quantize, distill, finetune, prune"
    )]
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

/// Value checks on a typed options struct (names and types were already checked by serde).
pub trait Validate {
    fn validate(&self, c: &mut Checker<'_>);
}

/// Where a [`Validate`] impl reports: the pointer of the object being checked and the keys the
/// request actually gave (an option set to its default is still "given").
pub struct Checker<'a> {
    at: String,
    given: Option<&'a Map<String, Value>>,
    problems: &'a mut Problems,
}

impl<'a> Checker<'a> {
    pub fn new(at: &str, given: &'a Value, problems: &'a mut Problems) -> Self {
        Self {
            at: at.to_string(),
            given: given.as_object(),
            problems,
        }
    }

    /// Whether the request named `key` in this object.
    pub fn given(&self, key: &str) -> bool {
        self.given
            .and_then(|o| o.get(key))
            .is_some_and(|v| !v.is_null())
    }

    /// The pointer of `key` in this object.
    pub fn pointer(&self, key: &str) -> String {
        if key.is_empty() {
            self.at.clone()
        } else {
            format!("{}/{}", self.at, pointer_key(key))
        }
    }

    /// Reports a problem with `key` of this object ("" for the object itself).
    pub fn add(&mut self, key: &str, detail: impl Into<String>) {
        let pointer = self.pointer(key);
        self.problems.add(pointer, detail);
    }

    /// Reports `detail` at `key` unless `ok`.
    pub fn check(&mut self, key: &str, ok: bool, detail: impl Into<String>) {
        if !ok {
            self.add(key, detail);
        }
    }

    /// Reports a problem anywhere in the document (an absolute pointer).
    pub fn add_at(&mut self, pointer: impl Into<String>, detail: impl Into<String>) {
        self.problems.add(pointer, detail);
    }

    /// Checks the object under `key` with its own [`Validate`] impl.
    pub fn nested<T: Validate>(&mut self, key: &str, value: &T) {
        let given = self.given.and_then(|o| o.get(key));
        let at = self.pointer(key);
        let mut inner = Checker {
            at,
            given: given.and_then(Value::as_object),
            problems: &mut *self.problems,
        };
        value.validate(&mut inner);
    }

    /// Checks each element of the list under `key`.
    pub fn each<T: Validate>(&mut self, key: &str, values: &[T]) {
        let list = self
            .given
            .and_then(|o| o.get(key))
            .and_then(Value::as_array);
        for (i, value) in values.iter().enumerate() {
            let mut inner = Checker {
                at: format!("{}/{i}", self.pointer(key)),
                given: list.and_then(|l| l.get(i)).and_then(Value::as_object),
                problems: &mut *self.problems,
            };
            value.validate(&mut inner);
        }
    }

    /// Checks a struct whose fields sit in this same object (`#[serde(flatten)]`).
    pub fn flattened<T: Validate>(&mut self, value: &T) {
        let mut inner = Checker {
            at: self.at.clone(),
            given: self.given,
            problems: &mut *self.problems,
        };
        value.validate(&mut inner);
    }
}

/// Parses `value` (found at pointer `at`) into `T`, reporting unknown keys, wrong types and
/// failed value checks into `problems`. Returns the value when it parsed, even with problems in
/// its values, so that callers can run further checks on it.
pub fn parse_into<T>(value: &Value, at: &str, problems: &mut Problems) -> Option<T>
where
    T: DeserializeOwned + Serialize + Validate,
{
    let (typed, work, stand_ins) = deserialize_reporting::<T>(value, at, problems);
    let typed = typed?;
    if let Ok(back) = serde_json::to_value(&typed) {
        unknown_keys(&work, &back, at, problems);
    }
    let mut checks = Problems::default();
    typed.validate(&mut Checker::new(at, &work, &mut checks));
    problems.0.extend(
        checks
            .0
            .into_iter()
            .filter(|p| !stand_ins.contains(&p.pointer)),
    );
    Some(typed)
}

/// [`parse_into`] for a whole document: the value, or every problem found.
pub fn parse<T>(value: &Value) -> Result<T, Vec<FieldError>>
where
    T: DeserializeOwned + Serialize + Validate,
{
    let mut problems = Problems::default();
    let typed = parse_into(value, "", &mut problems);
    match typed {
        Some(t) if problems.is_empty() => Ok(t),
        _ => Err(problems.0),
    }
}

/// At most this many type errors are collected from one value.
const MAX_TYPE_ERRORS: usize = 32;

/// Deserializes `value`, dropping each key serde rejects (reported) and trying again; a required
/// key that is missing (or was dropped) gets a stand-in value, so the rest is still checked.
/// Returns the typed value when one parsed, the document it parsed from, and the pointers of
/// the stand-ins (their value checks are not reported: the key already has its problem).
fn deserialize_reporting<T: DeserializeOwned>(
    value: &Value,
    at: &str,
    problems: &mut Problems,
) -> (Option<T>, Value, Vec<String>) {
    let mut work = value.clone();
    let mut removed: Vec<Vec<Seg>> = Vec::new();
    let mut stand_ins = Vec::new();
    for _ in 0..MAX_TYPE_ERRORS {
        let err = match attempt::<T>(&work) {
            Ok(t) => return (Some(t), work, stand_ins),
            Err(e) => e,
        };
        let Some(field) = missing_field(&err.message) else {
            let culprit = locate::<T>(&work, err.path.clone(), &err);
            problems.add(format!("{at}{}", pointer(&culprit)), err.message.clone());
            removed.push(culprit.clone());
            match removable_ancestor(&culprit) {
                Some(c) if remove(&mut work, &c) => removed.push(c),
                _ => return (None, work, stand_ins),
            }
            continue;
        };
        // The object that lacks it (serde may have lost track of where it is).
        let object = locate::<T>(&work, err.path.clone(), &err);
        let mut path = object.clone();
        path.push(Seg::Key(field.to_string()));
        if !removed.contains(&path) {
            problems.add(
                format!("{at}{}", pointer(&path)),
                format!("`{field}` is required"),
            );
        }
        if stand_in::<T>(&mut work, &path, field) {
            stand_ins.push(format!("{at}{}", pointer(&path)));
            continue;
        }
        // No value fits: parse on without the object that lacks it.
        match removable_ancestor(&object) {
            Some(c) if remove(&mut work, &c) => removed.push(c),
            _ => return (None, work, stand_ins),
        }
    }
    (None, work, stand_ins)
}

/// Puts a value of some JSON type at `path` that serde accepts for the missing `field`.
fn stand_in<T: DeserializeOwned>(work: &mut Value, path: &[Seg], field: &str) -> bool {
    let Some((Seg::Key(key), parent)) = path.split_last() else {
        return false;
    };
    let candidates = [
        Value::String(String::new()),
        Value::from(0),
        Value::Bool(false),
        Value::Array(vec![]),
        Value::Object(Map::new()),
    ];
    for candidate in candidates {
        let Some(object) = get_mut(work, parent).and_then(Value::as_object_mut) else {
            return false;
        };
        object.insert(key.clone(), candidate);
        match attempt::<T>(work) {
            Ok(_) => return true,
            Err(e) if missing_field(&e.message) == Some(field) => {}
            Err(e) if locate::<T>(work, e.path.clone(), &e) != path => return true,
            Err(_) => {}
        }
    }
    if let Some(object) = get_mut(work, parent).and_then(Value::as_object_mut) {
        object.remove(key);
    }
    false
}

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Debug, PartialEq)]
struct TypeError {
    path: Vec<Seg>,
    message: String,
}

fn attempt<T: DeserializeOwned>(work: &Value) -> Result<T, TypeError> {
    serde_path_to_error::deserialize::<_, T>(work).map_err(|e| TypeError {
        path: e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                _ => None,
            })
            .collect(),
        message: plain(&e.into_inner().to_string()),
    })
}

/// serde's messages, in the words the rest of the API uses: `unknown variant `x`, expected one
/// of `a`, `b`` becomes "unknown value `x`; expected one of: a, b", "a boolean" "true or false".
fn plain(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        if let Some((value, expected)) = rest.split_once(", expected one of ") {
            return format!(
                "unknown value {value}; expected one of: {}",
                expected.replace('`', "")
            );
        }
        if let Some((value, expected)) = rest.split_once(", expected ") {
            return format!(
                "unknown value {value}; expected {}",
                expected.replace('`', "")
            );
        }
    }
    message.replace("expected a boolean", "expected true or false")
}

fn pointer(path: &[Seg]) -> String {
    path.iter()
        .map(|s| match s {
            Seg::Key(k) => format!("/{}", pointer_key(k)),
            Seg::Index(i) => format!("/{i}"),
        })
        .collect()
}

fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
}

fn get<'v>(value: &'v Value, path: &[Seg]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, s| match s {
        Seg::Key(k) => v.get(k),
        Seg::Index(i) => v.get(i),
    })
}

/// The path itself when it ends in an object key, else the nearest ancestor that does (a
/// list element cannot be dropped without shifting the pointers of the ones after it).
fn removable_ancestor(path: &[Seg]) -> Option<Vec<Seg>> {
    let end = path.iter().rposition(|s| matches!(s, Seg::Key(_)))?;
    Some(path[..=end].to_vec())
}

fn get_mut<'v>(value: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    path.iter().try_fold(value, |v, s| match s {
        Seg::Key(k) => v.get_mut(k),
        Seg::Index(i) => v.get_mut(*i),
    })
}

/// Removes the object key `path` ends in.
fn remove(work: &mut Value, path: &[Seg]) -> bool {
    let Some((Seg::Key(last), parent)) = path.split_last() else {
        return false;
    };
    get_mut(work, parent)
        .and_then(Value::as_object_mut)
        .is_some_and(|o| o.remove(last).is_some())
}

/// The deepest key under `path` whose removal changes `err`: where serde lost track of the
/// path (tagged enums, flattened structs), the key it failed on.
fn locate<T: DeserializeOwned>(work: &Value, path: Vec<Seg>, err: &TypeError) -> Vec<Seg> {
    let Some(node) = get(work, &path) else {
        return path;
    };
    let children: Vec<Seg> = match node {
        Value::Object(o) => o.keys().map(|k| Seg::Key(k.clone())).collect(),
        Value::Array(a) => (0..a.len()).map(Seg::Index).collect(),
        _ => return path,
    };
    let mut fallback = None;
    for child in children {
        let mut candidate = path.clone();
        candidate.push(child);
        let mut trial = work.clone();
        if !remove_any(&mut trial, &candidate) {
            continue;
        }
        match attempt::<T>(&trial) {
            Err(e) if &e == err => continue,
            // Removing a required child: that child may be the object that lacks a field,
            // unless it is a plain value, which lacks nothing.
            Err(e) if missing_field(&e.message).is_some() => {
                if get(work, &candidate).is_some_and(|v| v.is_object() || v.is_array()) {
                    fallback.get_or_insert(candidate);
                }
            }
            _ => return locate::<T>(work, candidate, err),
        }
    }
    match fallback {
        Some(c) => locate::<T>(work, c, err),
        None => path,
    }
}

/// Removes an object key or a list element (trials only: list indexes shift).
fn remove_any(work: &mut Value, path: &[Seg]) -> bool {
    match path.split_last() {
        Some((Seg::Index(i), parent)) => {
            match get_mut(work, parent).and_then(Value::as_array_mut) {
                Some(a) if *i < a.len() => {
                    a.remove(*i);
                    true
                }
                _ => false,
            }
        }
        _ => remove(work, path),
    }
}

/// Keys of `given` that the typed value does not carry back (null, `[]` and `{}` values may
/// stand for an absent option and are not reported).
fn unknown_keys(given: &Value, back: &Value, at: &str, problems: &mut Problems) {
    match (given, back) {
        (Value::Object(g), Value::Object(b)) => {
            for (key, value) in g {
                match b.get(key) {
                    Some(inner) => unknown_keys(
                        value,
                        inner,
                        &format!("{at}/{}", pointer_key(key)),
                        problems,
                    ),
                    None if is_empty(value) => {}
                    None => {
                        let expected: Vec<&str> = b.keys().map(String::as_str).collect();
                        problems.add(
                            format!("{at}/{}", pointer_key(key)),
                            format!(
                                "unknown option `{key}`; expected one of: {}",
                                expected.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        (Value::Array(g), Value::Array(b)) if g.len() == b.len() => {
            for (i, (g, b)) in g.iter().zip(b).enumerate() {
                unknown_keys(g, b, &format!("{at}/{i}"), problems);
            }
        }
        // serde also builds a struct from a list of its fields' values; the API takes objects only.
        (Value::Array(_), Value::Object(_)) => {
            problems.add(at, "must be a JSON object, not a list");
        }
        _ => {}
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Serialize, Deserialize)]
    struct Inner {
        #[serde(default)]
        depth: u32,
        #[serde(default)]
        name: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Shared {
        #[serde(default)]
        epochs: u32,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum Tagged {
        One(Outer),
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Outer {
        #[serde(default)]
        size: u32,
        #[serde(default)]
        inner: Option<Inner>,
        #[serde(default)]
        list: Vec<u32>,
        #[serde(flatten)]
        shared: Shared,
    }

    impl Validate for Tagged {
        fn validate(&self, c: &mut Checker<'_>) {
            let Tagged::One(o) = self;
            c.check("size", o.size <= 10, "`size` must be at most 10");
        }
    }

    fn pointers(v: Value) -> Vec<String> {
        let mut p = parse::<Tagged>(&v)
            .unwrap_err()
            .into_iter()
            .map(|e| e.pointer)
            .collect::<Vec<_>>();
        p.sort();
        p
    }

    #[test]
    fn every_type_error_inside_a_tagged_enum_is_found_by_its_key() {
        assert_eq!(
            pointers(json!({"kind": "one", "size": "big", "inner": {"depth": -1}, "epochs": "x"})),
            vec!["/epochs", "/inner/depth", "/size"]
        );
    }

    #[test]
    fn unknown_keys_are_those_the_typed_value_does_not_give_back() {
        assert_eq!(
            pointers(json!({"kind": "one", "colour": 1, "inner": {"deep": true}, "list": []})),
            vec!["/colour", "/inner/deep"]
        );
    }

    #[test]
    fn value_checks_run_with_type_errors_and_unknown_keys_together() {
        assert_eq!(
            pointers(json!({"kind": "one", "size": 11, "list": [1, "two"], "extra": 0})),
            vec!["/extra", "/list/1", "/size"]
        );
    }

    #[test]
    fn a_list_is_not_an_object() {
        assert_eq!(
            pointers(json!({"kind": "one", "inner": [3]})),
            vec!["/inner"]
        );
    }

    #[test]
    fn an_unknown_tag_is_reported_at_the_tag() {
        let errors = parse::<Tagged>(&json!({"kind": "two", "size": 1})).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].pointer, "/kind");
        assert_eq!(errors[0].detail, "unknown value `two`; expected one");
    }

    #[test]
    fn a_missing_tag_is_required() {
        let errors = parse::<Tagged>(&json!({"size": 1})).unwrap_err();
        assert_eq!(errors[0].pointer, "/kind");
        assert_eq!(errors[0].detail, "`kind` is required");
    }
}
