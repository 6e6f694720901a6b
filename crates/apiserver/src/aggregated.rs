//! The APIServices served now ([`Aggregated`]: the remote behind each `group/version`, as its
//! last availability check left it) and the client identity the server shows aggregated
//! servers ([`FrontProxy`]). Kept by [`crate::aggregator`], read by every request's routing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use crate::status::Cause;

/// An APIService that names a Service, as the server proxies to it.
#[derive(Debug, Clone)]
pub struct Remote {
    pub name: String,
    pub group: String,
    pub version: String,
    pub(crate) service: Value,
    pub(crate) ca_bundle: Option<String>,
    pub(crate) insecure: bool,
    /// `spec.groupPriorityMinimum`, `spec.versionPriority`.
    pub(crate) priority: (i64, i64),
    /// The remote's APIResourceList from its last successful check.
    pub(crate) resources: Option<Value>,
    /// Whether the last check succeeded (aggregated discovery's `Current`, else `Stale`).
    pub(crate) fresh: bool,
}

/// The remotes served now, by `group/version`.
#[derive(Debug, Default)]
pub struct Aggregated {
    pub(crate) remotes: RwLock<Arc<HashMap<String, Remote>>>,
    /// Asks `run` to check the APIServices now (a request found its remote unavailable).
    pub(crate) recheck: tokio::sync::Notify,
}

impl Aggregated {
    pub(crate) fn all(&self) -> Arc<HashMap<String, Remote>> {
        self.remotes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Serves `remote` as `key` (`group/version`) at once, beside the others.
    pub(crate) fn publish(&self, key: &str, remote: Remote) {
        let mut remotes = self.remotes.write().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::clone(&remotes);
        next.insert(key.to_string(), remote);
        *remotes = Arc::new(next);
    }

    /// The remote that serves `path`, if one does.
    pub fn target(&self, path: &str) -> Option<Remote> {
        let rest = path.strip_prefix("/apis/")?;
        let mut segments = rest.split('/');
        let (group, version) = (segments.next()?, segments.next()?);
        if group.is_empty() || version.is_empty() {
            return None;
        }
        let remotes = self.remotes.read().unwrap_or_else(|e| e.into_inner());
        if remotes.is_empty() {
            return None;
        }
        remotes.get(&format!("{group}/{version}")).cloned()
    }
}

/// The front-proxy client identity the server shows aggregated servers.
#[derive(Debug, Clone)]
pub struct FrontProxy {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl FrontProxy {
    pub(crate) fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let certs = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .map_err(|e| e.to_string())?
            .ok_or("no private key")?;
        Ok((certs, key))
    }
}

/// Validates an APIService as upstream does.
pub fn validate(object: &Value) -> Vec<Cause> {
    let spec = &object["spec"];
    let mut causes = Vec::new();
    let mut cause = |reason: &'static str, field: &str, message: String| {
        causes.push(Cause { reason, message, field: field.into() })
    };
    let group = spec["group"].as_str().unwrap_or_default();
    let version = spec["version"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if version.is_empty() {
        cause("FieldValueRequired", "spec.version", "Required value".into());
    }
    if !version.is_empty() && name != name_of(group, version) {
        cause(
            "FieldValueInvalid",
            "metadata.name",
            format!("Invalid value: {name:?}: must be `spec.version+\".\"+spec.group`: {:?}", name_of(group, version)),
        );
    }
    for field in ["groupPriorityMinimum", "versionPriority"] {
        match spec[field].as_i64() {
            Some(value) if (1..=20000).contains(&value) || (field == "versionPriority" && value > 0) => {}
            Some(value) => cause(
                "FieldValueInvalid",
                &format!("spec.{field}"),
                format!("Invalid value: {value}: must be positive and less than 20000"),
            ),
            None => cause("FieldValueRequired", &format!("spec.{field}"), "Required value".into()),
        }
    }
    let service = &spec["service"];
    if service.is_object() {
        for field in ["namespace", "name"] {
            if service[field].as_str().is_none_or(str::is_empty) {
                cause("FieldValueRequired", &format!("spec.service.{field}"), "Required value".into());
            }
        }
        if spec["insecureSkipTLSVerify"] == true && spec["caBundle"].as_str().is_some_and(|b| !b.is_empty()) {
            cause(
                "FieldValueInvalid",
                "spec.insecureSkipTLSVerify",
                "Invalid value: true: may not be true if caBundle is present".into(),
            );
        }
    }
    causes
}

/// Defaults an APIService (`spec.service.port`: 443).
pub fn default(object: &mut Value) {
    if let Some(service) = object.get_mut("spec").and_then(|s| s.get_mut("service")).and_then(Value::as_object_mut) {
        service.entry("port").or_insert(json!(443));
    }
}

pub const GROUP: &str = "apiregistration.k8s.io";

/// `v1.apps`, `v1.` for the core group.
pub(crate) fn name_of(group: &str, version: &str) -> String {
    format!("{version}.{group}")
}
