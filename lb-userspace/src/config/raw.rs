//! The file as written: serde structs that mirror the YAML keys one to one.
//!
//! Every leaf is a [`Scalar`], not its final type, so that serde stops only on a wrong shape
//! (a list where a mapping belongs); a wrong value (`weight: heavy`, `interval: 2`) is left to
//! `validate.rs`, which reports all of them, each in words that fit the key.
//!
//! `deny_unknown_fields` is kept as a safety net: [`strip_unknown_keys`] has already reported
//! and removed every key these structs do not declare, so that one unknown key does not hide
//! the rest of the file's errors.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_yaml::{Mapping, Value};

use super::locate::{Problem, item, join};

/// A YAML scalar of any type; `null` is an absent key (`Option::None`).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Int(n) => write!(f, "{n}"),
            Self::Float(x) => write!(f, "{x}"),
            Self::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a single value (text, a number, true or false)")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar::Bool(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v.into()))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Float(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Str(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar::Str(v))
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// For sections: a key written with nothing after it (`admin:`) is present, with every default;
/// plain `Option` would read it as absent.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of lb settings (admin, dataplane, services, ...)"
)]
pub(super) struct RawConfig {
    #[serde(default, deserialize_with = "present")]
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub dataplane: Option<RawDataplane>,
    #[serde(default)]
    pub shutdown_timeout: Option<Scalar>,
    #[serde(default)]
    pub run_as: Option<Scalar>,
    #[serde(default, deserialize_with = "present")]
    pub services: Option<Vec<RawService>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping (listen, token_file)")]
pub(super) struct RawAdmin {
    pub listen: Option<Scalar>,
    pub token_file: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (mode, pin_path, xdp, sockmap)"
)]
pub(super) struct RawDataplane {
    pub mode: Option<Scalar>,
    pub pin_path: Option<Scalar>,
    #[serde(default, deserialize_with = "present")]
    pub xdp: Option<RawXdp>,
    #[serde(default)]
    pub sockmap: Option<RawSockmap>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (interface, attach, forwarding, flow_table_size)"
)]
pub(super) struct RawXdp {
    pub interface: Option<Scalar>,
    pub attach: Option<Scalar>,
    pub forwarding: Option<Scalar>,
    pub flow_table_size: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (enabled, promote_after_bytes)"
)]
pub(super) struct RawSockmap {
    pub enabled: Option<Scalar>,
    pub promote_after_bytes: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with name, listen, backends, ..."
)]
pub(super) struct RawService {
    pub name: Option<Scalar>,
    pub listen: Option<Scalar>,
    pub algorithm: Option<Scalar>,
    pub maglev_table_size: Option<Scalar>,
    #[serde(default, deserialize_with = "present")]
    pub backends: Option<Vec<RawBackend>>,
    #[serde(default, deserialize_with = "present")]
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub ejection: Option<RawEjection>,
    pub connect_timeout: Option<Scalar>,
    pub retries: Option<Scalar>,
    pub idle_timeout: Option<Scalar>,
    pub max_connections: Option<Scalar>,
    pub proxy_protocol: Option<Scalar>,
    pub tcp_keepalive: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backend: a mapping with address, weight, health_check"
)]
pub(super) struct RawBackend {
    pub address: Option<Scalar>,
    pub weight: Option<Scalar>,
    #[serde(default)]
    pub health_check: Option<RawHealthCheckOverride>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a health check: a mapping with kind, interval, timeout, ..."
)]
pub(super) struct RawHealthCheck {
    pub kind: Option<Scalar>,
    pub interval: Option<Scalar>,
    pub timeout: Option<Scalar>,
    pub rise: Option<Scalar>,
    pub fall: Option<Scalar>,
    pub jitter_percent: Option<Scalar>,
    pub port: Option<Scalar>,
    pub address: Option<Scalar>,
    pub initial_state: Option<Scalar>,
    // kind: http
    pub path: Option<Scalar>,
    pub expect_status: Option<Scalar>,
    pub host: Option<Scalar>,
    // kind: send_expect
    pub send: Option<Scalar>,
    pub send_hex: Option<Scalar>,
    pub expect: Option<Scalar>,
    pub expect_hex: Option<Scalar>,
    pub expect_regex: Option<Scalar>,
    pub max_response: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of health check settings for this backend"
)]
pub(super) struct RawHealthCheckOverride {
    pub port: Option<Scalar>,
    pub address: Option<Scalar>,
    // kind: http
    pub path: Option<Scalar>,
    pub host: Option<Scalar>,
    pub expect_status: Option<Scalar>,
    // kind: send_expect
    pub send: Option<Scalar>,
    pub send_hex: Option<Scalar>,
    pub expect: Option<Scalar>,
    pub expect_hex: Option<Scalar>,
    pub expect_regex: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping (consecutive_failures, base_time, max_time, max_percent)"
)]
pub(super) struct RawEjection {
    pub consecutive_failures: Option<Scalar>,
    pub base_time: Option<Scalar>,
    pub max_time: Option<Scalar>,
    pub max_percent: Option<Scalar>,
}

/// The keys `T` declares, in declaration order, read from its derived `Deserialize` so that the
/// unknown-key check can never drift from the structs above.
pub(super) fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut keys: &'static [&'static str] = &[];
    // Always an error: `KeyCapture` answers every request with one, after noting the keys.
    let _ = T::deserialize(KeyCapture(&mut keys));
    keys
}

/// A deserializer that only records the field list serde hands to `deserialize_struct`.
struct KeyCapture<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for KeyCapture<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("keys captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Reports every key the raw structs do not declare, at any depth, and removes it, so that
/// deserializing what is left can only fail on a wrong shape. Top-level keys starting with `x-`
/// are removed silently.
pub(super) fn strip_unknown_keys(document: &mut Value, problems: &mut Vec<Problem>) {
    let Some(top) = document.as_mapping_mut() else {
        return;
    };
    // Top-level `x-...` keys are the user's own, e.g. to hold YAML anchors (as in Compose files).
    top.retain(|key, _| !key.as_str().is_some_and(|k| k.starts_with("x-")));
    retain_known::<RawConfig>(top, "", problems);
    if let Some(admin) = section(top, "admin") {
        retain_known::<RawAdmin>(admin, "admin", problems);
    }
    if let Some(dataplane) = section(top, "dataplane") {
        retain_known::<RawDataplane>(dataplane, "dataplane", problems);
        if let Some(xdp) = section(dataplane, "xdp") {
            retain_known::<RawXdp>(xdp, "dataplane.xdp", problems);
        }
        if let Some(sockmap) = section(dataplane, "sockmap") {
            retain_known::<RawSockmap>(sockmap, "dataplane.sockmap", problems);
        }
    }
    for (i, service) in list(top, "services") {
        let path = item("services", i);
        retain_known::<RawService>(service, &path, problems);
        if let Some(check) = section(service, "health_check") {
            retain_known::<RawHealthCheck>(check, &join(&path, "health_check"), problems);
        }
        if let Some(ejection) = section(service, "ejection") {
            retain_known::<RawEjection>(ejection, &join(&path, "ejection"), problems);
        }
        for (j, backend) in list(service, "backends") {
            let path = item(&join(&path, "backends"), j);
            retain_known::<RawBackend>(backend, &path, problems);
            if let Some(check) = section(backend, "health_check") {
                retain_known::<RawHealthCheckOverride>(
                    check,
                    &join(&path, "health_check"),
                    problems,
                );
            }
        }
    }
}

fn section<'m>(mapping: &'m mut Mapping, key: &str) -> Option<&'m mut Mapping> {
    mapping.get_mut(key).and_then(Value::as_mapping_mut)
}

fn list<'m>(mapping: &'m mut Mapping, key: &str) -> impl Iterator<Item = (usize, &'m mut Mapping)> {
    mapping
        .get_mut(key)
        .and_then(Value::as_sequence_mut)
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, value)| Some((i, value.as_mapping_mut()?)))
}

fn retain_known<T: DeserializeOwned>(
    mapping: &mut Mapping,
    path: &str,
    problems: &mut Vec<Problem>,
) {
    let known = keys_of::<T>();
    mapping.retain(|key, _| {
        let name = key_text(key);
        if known.contains(&name.as_str()) {
            return true;
        }
        let within = if path.is_empty() {
            "at the top level".to_owned()
        } else {
            format!("in {path}")
        };
        let mut message = format!(
            "unknown key {name:?} {within}; expected one of: {}",
            known.join(", ")
        );
        if let Some(near) = closest(&name, known) {
            message.push_str(&format!(" (did you mean {near:?}?)"));
        }
        problems.push(Problem::at_key(&join(path, &name), message));
        false
    });
}

/// A mapping key as the user wrote it, near enough to find it in the index.
fn key_text(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        _ => "?".to_owned(),
    }
}

/// The known key within two edits of `name` (a typo), if there is exactly one best.
pub(super) fn closest(name: &str, known: &[&'static str]) -> Option<&'static str> {
    let mut best: Option<(usize, &'static str)> = None;
    let mut tie = false;
    for &candidate in known {
        let d = edit_distance(name, candidate);
        match best {
            Some((bd, _)) if d > bd => {}
            Some((bd, _)) if d == bd => tie = true,
            _ => {
                best = Some((d, candidate));
                tie = false;
            }
        }
    }
    match best {
        Some((d, candidate)) if d <= 2 && !tie => Some(candidate),
        _ => None,
    }
}

/// Levenshtein distance with adjacent transpositions counted as one edit (`wieght` -> `weight`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_structs() {
        assert_eq!(
            keys_of::<RawBackend>(),
            ["address", "weight", "health_check"]
        );
        assert_eq!(
            keys_of::<RawConfig>(),
            [
                "admin",
                "dataplane",
                "shutdown_timeout",
                "run_as",
                "services"
            ]
        );
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert_eq!(edit_distance("wieght", "weight"), 1);
        assert_eq!(closest("wieght", keys_of::<RawBackend>()), Some("weight"));
        assert_eq!(closest("port", keys_of::<RawBackend>()), None);
    }
}
