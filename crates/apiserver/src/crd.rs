//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`): the definitions themselves (their
//! validation, defaults and status, as upstream's apiextensions-apiserver sets them), and the
//! resources they add while the server runs.
//!
//! Every server keeps the set of served custom resources from a watch of the definitions (so a
//! definition written through another server of an HA pair is served here too), one change at
//! a time, and answers a write of its own once the set has seen it (a client that creates a
//! definition and waits for `Established` can use it right away). A served resource is a [`Resource`] like the
//! built-in ones, with [`Custom`] for what the definition says of it (schema, printer columns,
//! subresources). Resources are interned: one definition version's resource is made once and
//! kept for the life of the process, so a definition created again costs nothing more.
//!
//! Deleting a definition deletes its objects first (the `customresourcecleanup` finalizer that
//! every definition gets), then the definition, and then the resource leaves discovery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tugboat_store::{EventKind, Revision};

use serde_json::{Value, json};

use crate::handlers::ApiState;
use crate::registry::{self, Resource};
use crate::status::{ApiError, Cause};
use crate::watch_cache::Change;

/// The finalizer upstream gives every definition: its objects go before it does.
pub const CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// What a definition says of one served version of its resource.
#[derive(Debug, PartialEq)]
pub struct Custom {
    /// The definition's name (`<plural>.<group>`).
    pub crd: String,
    /// The version objects are stored in.
    pub storage_version: String,
    /// `openAPIV3Schema`, when the version has one.
    pub schema: Option<Value>,
    /// `additionalPrinterColumns`.
    pub columns: Vec<PrinterColumn>,
    /// Whether the `/status` subresource is enabled.
    pub status: bool,
    /// The `/scale` subresource's paths, when enabled.
    pub scale: Option<ScalePaths>,
    pub list_kind: String,
    /// The definition is being deleted: its objects may be read and deleted, not created.
    pub terminating: bool,
    /// `spec.conversion.webhook` (`clientConfig`, `conversionReviewVersions`) when a webhook
    /// converts between versions.
    pub webhook: Option<Value>,
    /// The version's `selectableFields`, as field selectors name them (`spec.color`).
    pub selectable: Vec<String>,
    /// A digest of what the definition says of the version (names, scope, schema…): it changes
    /// when the published OpenAPI document of the resource does.
    pub digest: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub kind: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// The custom resources this server serves now, kept from the definitions' changes one at a
/// time (a change costs what its own definition does, not what all of them do: ~1,000
/// definitions are a normal install).
#[derive(Debug)]
pub struct CustomResources {
    served: RwLock<Served>,
    /// The store revision the served set reflects (what a write of a definition waits for).
    revision: tokio::sync::watch::Sender<Revision>,
}

#[derive(Debug, Default)]
struct Served {
    /// Every definition's [`outline`] by store key, and the resources it serves.
    definitions: HashMap<String, (Arc<Value>, Vec<&'static Resource>)>,
    /// All the resources, sorted by group and version priority.
    all: Arc<Vec<&'static Resource>>,
    /// By `(group, version, plural)`.
    index: HashMap<(&'static str, &'static str, &'static str), &'static Resource>,
}

impl Default for CustomResources {
    fn default() -> CustomResources {
        CustomResources { served: Default::default(), revision: tokio::sync::watch::Sender::new(0) }
    }
}

impl Served {
    fn reindex(&mut self) {
        let mut all: Vec<&'static Resource> =
            self.definitions.values().flat_map(|(_, resources)| resources.iter().copied()).collect();
        all.sort_by(|a, b| {
            a.group.cmp(b.group).then_with(|| version_priority(a.version, b.version)).then(a.plural.cmp(b.plural))
        });
        self.index = all.iter().map(|r| ((r.group, r.version, r.plural), *r)).collect();
        self.all = Arc::new(all);
    }
}

impl CustomResources {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Served> {
        self.served.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Served> {
        self.served.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        self.read().index.get(&(group, version, plural)).copied()
    }

    pub fn all(&self) -> Arc<Vec<&'static Resource>> {
        self.read().all.clone()
    }

    /// Every definition there is (as of the last change seen), in [`outline`].
    pub fn definitions(&self) -> Vec<Arc<Value>> {
        self.read().definitions.values().map(|(definition, _)| definition.clone()).collect()
    }

    /// Serves what `definitions` (every one there is, by store key) define, as of `revision`.
    pub fn replace(&self, definitions: impl IntoIterator<Item = (String, Value)>, revision: Revision) {
        {
            let mut served = self.write();
            served.definitions = definitions
                .into_iter()
                .map(|(key, definition)| {
                    let resources = resources_of(&definition);
                    (key, (Arc::new(outline(&definition)), resources))
                })
                .collect();
            served.reindex();
        }
        self.revision.send_if_modified(|seen| std::mem::replace(seen, revision) != revision);
    }

    /// Takes one change of a definition.
    pub fn apply(&self, change: &Change) {
        {
            let mut served = self.write();
            match change.kind {
                EventKind::Put => {
                    let resources = resources_of(&change.object);
                    let unchanged = served.definitions.get(&change.key).is_some_and(|(_, old)| {
                        old.len() == resources.len() && old.iter().zip(&resources).all(|(a, b)| std::ptr::eq(*a, *b))
                    });
                    served.definitions.insert(change.key.clone(), (Arc::new(outline(&change.object)), resources));
                    if !unchanged {
                        served.reindex();
                    }
                }
                EventKind::Delete => {
                    if served.definitions.remove(&change.key).is_some() {
                        served.reindex();
                    }
                }
            }
        }
        self.revision.send_if_modified(|seen| {
            let newer = change.revision > *seen;
            *seen = (*seen).max(change.revision);
            newer
        });
    }

    /// Tells of every change of the served set (the revision it reflects).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    /// Waits (up to `timeout`) until the served set reflects `revision`; whether it does.
    pub async fn reflect(&self, revision: Revision, timeout: Duration) -> bool {
        let mut seen = self.revision.subscribe();
        tokio::time::timeout(timeout, seen.wait_for(|seen| *seen >= revision)).await.is_ok_and(|r| r.is_ok())
    }
}

/// What is kept of a definition besides the resources it serves: its names (what others are
/// checked against), versions and deletion (what finishing it needs). Not its schemas: a
/// decoded schema is many times its stored size, and a cluster may have a thousand.
fn outline(crd: &Value) -> Value {
    let (metadata, spec) = (&crd["metadata"], &crd["spec"]);
    let versions: Vec<Value> = spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| json!({"name": v["name"], "served": v["served"], "storage": v["storage"]}))
        .collect();
    json!({
        "metadata": {"name": metadata["name"], "finalizers": metadata["finalizers"],
                     "deletionTimestamp": metadata["deletionTimestamp"], "resourceVersion": metadata["resourceVersion"]},
        "spec": {"group": spec["group"], "names": spec["names"], "scope": spec["scope"], "versions": versions},
        "status": {"acceptedNames": crd["status"]["acceptedNames"]},
    })
}

fn crds() -> &'static Resource {
    registry::find("apiextensions.k8s.io", "v1", "customresourcedefinitions").expect("CRDs are served")
}

/// Reads every definition from the store and serves what they define.
pub async fn refresh(state: &ApiState) -> Result<(), ApiError> {
    let prefix = crds().prefix(None);
    let page = state
        .store
        .list(&prefix, tugboat_store::ListOptions::default())
        .await
        .map_err(|e| ApiError::from_store(e, crds().group, crds().plural, ""))?;
    let definitions =
        page.kvs.into_iter().filter_map(|kv| Some((kv.key, crate::watch_cache::decode(&kv.value, kv.mod_revision)?)));
    state.custom.replace(definitions, page.revision);
    Ok(())
}

/// Keeps the served set in step with the stored definitions, and finishes the deletion of
/// definitions being deleted; runs for the life of the server.
pub async fn run(state: Arc<ApiState>) {
    let prefix = crds().prefix(None);
    loop {
        let cache = match state.caches.get(&prefix).await {
            Ok(cache) => cache,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the CustomResourceDefinitions");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(subscription) = cache.subscribe_keyed(&prefix) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        state.custom.replace(subscription.initial, subscription.revision);
        let mut live = subscription.live;
        loop {
            let terminating: Vec<Arc<Value>> =
                state.custom.definitions().into_iter().filter(|crd| is_terminating(crd)).collect();
            for crd in &terminating {
                if let Err(error) = clean_up(&state, crd).await {
                    tracing::warn!(error = %error.message, crd = %crd["metadata"]["name"], "cannot finish deleting a CustomResourceDefinition");
                }
            }
            // While a definition waits for its objects to go (finalizers of theirs), look again
            // now and then as well as on every change.
            let wait = if terminating.is_empty() { Duration::from_secs(3600) } else { Duration::from_secs(1) };
            match tokio::time::timeout(wait, live.recv()).await {
                Ok(Ok(change)) => {
                    if change.revision > subscription.revision {
                        state.custom.apply(&change);
                    }
                }
                Err(_) => {}
                // Changes were missed: start again from the state.
                Ok(Err(crate::watch_cache::RecvError::Lagged(_))) => break,
                Ok(Err(crate::watch_cache::RecvError::Closed)) => break,
            }
        }
    }
}

fn is_terminating(crd: &Value) -> bool {
    crd["metadata"]["deletionTimestamp"].is_string()
}

/// Deletes the objects of a definition being deleted; once none is left, lets the definition go.
async fn clean_up(state: &ApiState, crd: &Value) -> Result<(), ApiError> {
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    let finalizers = crd["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
    if !finalizers.iter().any(|f| f == CLEANUP_FINALIZER) {
        return Ok(());
    }
    let (group, plural) = (crd["spec"]["group"].as_str().unwrap_or(""), crd["spec"]["names"]["plural"].as_str());
    let storage = storage_version(crd);
    let resource = match (plural, storage) {
        (Some(plural), Some(version)) => state.custom.find(group, &version, plural),
        _ => None,
    };
    if let Some(resource) = resource {
        let objects = crate::handlers::cached_list(state, resource, None).await?;
        if !objects.is_empty() {
            for object in &objects {
                let namespace = object["metadata"]["namespace"].as_str();
                let object_name = object["metadata"]["name"].as_str().unwrap_or_default();
                if object["metadata"]["deletionTimestamp"].is_string() {
                    continue;
                }
                match crate::handlers::delete_one(
                    state,
                    resource,
                    namespace,
                    object_name,
                    &json!({}),
                    &crate::handlers::Write::internal("customresourcecleanup"),
                )
                .await
                {
                    Ok(_) => {}
                    Err(error) if error.code == 404 => {}
                    Err(error) => return Err(error),
                }
            }
            return Ok(());
        }
    }
    // No object left: remove the finalizer (the definition goes with its last one).
    let write = crate::handlers::Write::internal("apiextensions-apiserver");
    let removed =
        crate::handlers::modify(state, (crds(), None, name), crate::handlers::View::Whole, &write, |current, _| {
            let mut object = current.clone();
            if let Some(finalizers) = object["metadata"]["finalizers"].as_array_mut() {
                finalizers.retain(|f| f != CLEANUP_FINALIZER);
            }
            Ok(object)
        })
        .await;
    match removed {
        Ok(_) => Ok(()),
        Err(error) if error.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

fn storage_version(crd: &Value) -> Option<String> {
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["storage"] == json!(true))
        .and_then(|v| v["name"].as_str())
        .map(str::to_string)
}

fn condition_true(crd: &Value, kind: &str) -> bool {
    crd["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| conditions.iter().any(|c| c["type"] == kind && c["status"] == "True"))
}

/// Interns a string for the life of the process.
fn leak(text: &str) -> &'static str {
    static STRINGS: Mutex<Option<std::collections::HashSet<&'static str>>> = Mutex::new(None);
    let mut strings = STRINGS.lock().unwrap_or_else(|e| e.into_inner());
    let strings = strings.get_or_insert_with(Default::default);
    if let Some(found) = strings.get(text) {
        return found;
    }
    let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
    strings.insert(leaked);
    leaked
}

fn leak_list(items: &Value) -> &'static [&'static str] {
    let items: Vec<&'static str> = items.as_array().into_iter().flatten().filter_map(Value::as_str).map(leak).collect();
    if items.is_empty() { &[] } else { Box::leak(items.into_boxed_slice()) }
}

fn no_protobuf(_: &[u8]) -> Result<Value, String> {
    Err("custom resources are not served as protobuf".into())
}

/// The resources a definition serves (one per served version), once its names are accepted.
fn resources_of(crd: &Value) -> Vec<&'static Resource> {
    static INTERNED: Mutex<Option<HashMap<String, &'static Resource>>> = Mutex::new(None);
    if !condition_true(crd, "Established") && !is_terminating(crd) {
        return Vec::new();
    }
    let spec = &crd["spec"];
    let names = if crd["status"]["acceptedNames"]["plural"].is_string() {
        &crd["status"]["acceptedNames"]
    } else {
        &spec["names"]
    };
    let (Some(group), Some(plural), Some(kind), Some(storage_version)) =
        (spec["group"].as_str(), names["plural"].as_str(), names["kind"].as_str(), storage_version(crd))
    else {
        return Vec::new();
    };
    let mut served = Vec::new();
    for version in spec["versions"].as_array().into_iter().flatten().filter(|v| v["served"] == json!(true)) {
        let Some(version_name) = version["name"].as_str() else { continue };
        let key = json!([
            crd["metadata"]["name"],
            group,
            names,
            spec["scope"],
            version,
            storage_version,
            is_terminating(crd),
            spec["conversion"]
        ])
        .to_string();
        let mut interned = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
        let interned = interned.get_or_insert_with(Default::default);
        if let Some(resource) = interned.get(&key) {
            served.push(*resource);
            continue;
        }
        let subresources = &version["subresources"];
        let scale = subresources["scale"].as_object().map(|scale| ScalePaths {
            spec_replicas: scale.get("specReplicasPath").and_then(Value::as_str).unwrap_or(".spec.replicas").into(),
            status_replicas: scale
                .get("statusReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".status.replicas")
                .into(),
            label_selector: scale.get("labelSelectorPath").and_then(Value::as_str).map(str::to_string),
        });
        let columns = version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| PrinterColumn {
                name: c["name"].as_str().unwrap_or_default().into(),
                kind: c["type"].as_str().unwrap_or("string").into(),
                format: c["format"].as_str().unwrap_or_default().into(),
                description: c["description"].as_str().unwrap_or_default().into(),
                priority: c["priority"].as_i64().unwrap_or(0),
                json_path: c["jsonPath"].as_str().unwrap_or_default().into(),
            })
            .collect();
        let custom: &'static Custom = Box::leak(Box::new(Custom {
            crd: crd["metadata"]["name"].as_str().unwrap_or_default().into(),
            storage_version: storage_version.clone(),
            schema: version["schema"].get("openAPIV3Schema").cloned(),
            columns,
            status: subresources["status"].is_object(),
            scale,
            list_kind: names["listKind"].as_str().map(str::to_string).unwrap_or_else(|| format!("{kind}List")),
            terminating: is_terminating(crd),
            webhook: (spec["conversion"]["strategy"] == "Webhook").then(|| spec["conversion"]["webhook"].clone()),
            selectable: version["selectableFields"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["jsonPath"].as_str())
                .map(|path| path.trim_start_matches('.').to_string())
                .collect(),
            digest: {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut hasher);
                hasher.finish()
            },
        }));
        let singular = names["singular"].as_str().map(str::to_string).unwrap_or_else(|| kind.to_lowercase());
        let resource: &'static Resource = Box::leak(Box::new(Resource {
            group: leak(group),
            version: leak(version_name),
            kind: leak(kind),
            plural: leak(plural),
            singular: leak(&singular),
            namespaced: spec["scope"] == "Namespaced",
            short_names: leak_list(&names["shortNames"]),
            categories: leak_list(&names["categories"]),
            storage: leak(&format!("{group}/{plural}")),
            schema: registry::schema_of::<Value>,
            conversion: None,
            protobuf: no_protobuf,
            custom: Some(custom),
        }));
        interned.insert(key, resource);
        served.push(resource);
    }
    served
}

/// A conversion webhook's settings: a client config (URL or Service, as admission webhooks
/// have) and the review versions it speaks.
fn validate_conversion_webhook(webhook: &mut Value, causes: &mut Vec<Cause>) {
    if !webhook.is_object() {
        causes.push(cause(
            "FieldValueRequired",
            "spec.conversion.webhook",
            "Required value: required when strategy is set to Webhook",
        ));
        return;
    }
    let config = &mut webhook["clientConfig"];
    if !config.is_object() {
        causes.push(cause(
            "FieldValueRequired",
            "spec.conversion.webhook.clientConfig",
            "Required value: required when strategy is set to Webhook",
        ));
    } else {
        if let Some(service) = config.get_mut("service").and_then(Value::as_object_mut) {
            service.entry("port").or_insert(json!(443));
        }
        let (url, service) = (config["url"].is_string(), config["service"].is_object());
        if url == service {
            causes.push(cause(
                "FieldValueRequired",
                "spec.conversion.webhook.clientConfig",
                "Required value: exactly one of url or service is required",
            ));
        }
        if url && !config["url"].as_str().unwrap_or_default().starts_with("https://") {
            causes.push(cause(
                "FieldValueInvalid",
                "spec.conversion.webhook.clientConfig.url",
                format!("Invalid value: {}: 'https' is the only allowed URL scheme", config["url"]),
            ));
        }
        for field in ["name", "namespace"] {
            if service && config["service"][field].as_str().is_none_or(str::is_empty) {
                causes.push(cause(
                    "FieldValueRequired",
                    &format!("spec.conversion.webhook.clientConfig.service.{field}"),
                    format!("Required value: service {field} is required"),
                ));
            }
        }
    }
    let versions = webhook["conversionReviewVersions"].as_array().cloned().unwrap_or_default();
    if !versions.iter().any(|v| v == "v1" || v == "v1beta1") {
        causes.push(cause(
            "FieldValueRequired",
            "spec.conversion.webhook.conversionReviewVersions",
            "Required value: must include at least one of v1, v1beta1",
        ));
    }
}

fn invalid_crd(name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid("apiextensions.k8s.io", "CustomResourceDefinition", name, causes)
}

fn cause(reason: &'static str, field: &str, message: impl Into<String>) -> Cause {
    Cause { reason, message: message.into(), field: field.into() }
}

fn is_dns1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[bytes.len() - 1] != b'-'
}

/// Validates a definition and fills in what upstream defaults and what its controllers would
/// report (`acceptedNames`, `NamesAccepted`, `Established`, `storedVersions`); `others` are
/// the other definitions there are, `old` the definition before an update.
pub fn prepare(object: &mut Value, others: &[Arc<Value>], old: Option<&Value>) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let mut causes = Vec::new();
    let spec = object["spec"].as_object_mut().map(std::mem::take).unwrap_or_default();
    let mut spec = Value::Object(spec);
    let group = spec["group"].as_str().unwrap_or_default().to_string();
    if group.is_empty() {
        causes.push(cause("FieldValueRequired", "spec.group", "Required value"));
    } else if !group.contains('.') {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.group",
            format!("Invalid value: {group:?}: should be a domain with at least one dot"),
        ));
    }
    let names = &mut spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default().to_string();
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    if plural.is_empty() {
        causes.push(cause("FieldValueRequired", "spec.names.plural", "Required value"));
    } else if !crate::object::is_dns_label(&plural) {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.names.plural",
            format!("Invalid value: {plural:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
        ));
    }
    if kind.is_empty() {
        causes.push(cause("FieldValueRequired", "spec.names.kind", "Required value"));
    }
    if names["singular"].as_str().is_none_or(str::is_empty) && !kind.is_empty() {
        names["singular"] = json!(kind.to_lowercase());
    }
    if names["listKind"].as_str().is_none_or(str::is_empty) && !kind.is_empty() {
        names["listKind"] = json!(format!("{kind}List"));
    }
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(cause(
            "FieldValueInvalid",
            "metadata.name",
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        Some(other) => causes.push(cause(
            "FieldValueNotSupported",
            "spec.scope",
            format!("Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""),
        )),
        None => causes.push(cause("FieldValueRequired", "spec.scope", "Required value")),
    }
    let versions = spec["versions"].as_array_mut().map(std::mem::take).unwrap_or_default();
    if versions.is_empty() {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.versions",
            "Invalid value: must have exactly one version marked as storage version",
        ));
    }
    let storage = versions.iter().filter(|v| v["storage"] == json!(true)).count();
    if !versions.is_empty() && storage != 1 {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.versions",
            format!("Invalid value: {storage}: must have exactly one version marked as storage version"),
        ));
    }
    for (i, version) in versions.iter().enumerate() {
        let field = format!("spec.versions[{i}]");
        let version_name = version["name"].as_str().unwrap_or_default();
        if version_name.is_empty() {
            causes.push(cause("FieldValueRequired", &format!("{field}.name"), "Required value"));
        } else if !is_dns1035_label(version_name) {
            causes.push(cause(
                "FieldValueInvalid",
                &format!("{field}.name"),
                format!("Invalid value: {version_name:?}: a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"),
            ));
        }
        if versions[..i].iter().any(|v| v["name"] == version["name"]) {
            causes.push(cause(
                "FieldValueDuplicate",
                &format!("{field}.name"),
                format!("Duplicate value: {:?}", version_name),
            ));
        }
        if !version["served"].is_boolean() {
            causes.push(cause("FieldValueRequired", &format!("{field}.served"), "Required value"));
        }
        if !version["storage"].is_boolean() {
            causes.push(cause("FieldValueRequired", &format!("{field}.storage"), "Required value"));
        }
        let schema = &version["schema"]["openAPIV3Schema"];
        if !schema.is_object() {
            causes.push(cause(
                "FieldValueRequired",
                &format!("{field}.schema.openAPIV3Schema"),
                "Required value: schemas are required",
            ));
        } else if schema["type"] != "object" && schema["x-kubernetes-preserve-unknown-fields"] != json!(true) {
            causes.push(cause(
                "FieldValueInvalid",
                &format!("{field}.schema.openAPIV3Schema.type"),
                format!("Invalid value: {:?}: must be object at the root", schema["type"].as_str().unwrap_or("")),
            ));
        } else {
            causes.extend(crate::rules::compile_errors(schema, &format!("{field}.schema.openAPIV3Schema")));
        }
        if let Some(columns) = version["additionalPrinterColumns"].as_array() {
            for (j, column) in columns.iter().enumerate() {
                for required in ["name", "type", "jsonPath"] {
                    if column[required].as_str().is_none_or(str::is_empty) {
                        causes.push(cause(
                            "FieldValueRequired",
                            &format!("{field}.additionalPrinterColumns[{j}].{required}"),
                            "Required value",
                        ));
                    }
                }
            }
        }
    }
    spec["versions"] = Value::Array(versions);
    if spec["conversion"].is_null() {
        spec["conversion"] = json!({"strategy": "None"});
    }
    match spec["conversion"]["strategy"].as_str() {
        Some("None") => {
            if spec["conversion"]["webhook"].is_object() {
                causes.push(cause(
                    "FieldValueForbidden",
                    "spec.conversion.webhook",
                    "Forbidden: should not be set when strategy is not set to Webhook",
                ));
            }
        }
        Some("Webhook") => validate_conversion_webhook(&mut spec["conversion"]["webhook"], &mut causes),
        other => causes.push(cause(
            "FieldValueNotSupported",
            "spec.conversion.strategy",
            format!("Unsupported value: {:?}: supported values: \"None\", \"Webhook\"", other.unwrap_or("")),
        )),
    }
    object["spec"] = spec;
    if let Some(old) = old {
        for field in ["group", "scope"] {
            if old["spec"][field] != object["spec"][field] && !(field == "scope" && old["spec"][field].is_null()) {
                causes.push(cause(
                    "FieldValueInvalid",
                    &format!("spec.{field}"),
                    format!("Invalid value: {}: field is immutable", object["spec"][field]),
                ));
            }
        }
    }
    if !causes.is_empty() {
        return Err(invalid_crd(&name, causes));
    }
    // Every definition keeps its objects until they are gone.
    let finalizers = object["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
    if old.is_none() && !finalizers.iter().any(|f| f == CLEANUP_FINALIZER) {
        let mut finalizers = finalizers;
        finalizers.push(json!(CLEANUP_FINALIZER));
        object["metadata"]["finalizers"] = Value::Array(finalizers);
    }
    set_status(object, others, old);
    Ok(())
}

fn now() -> String {
    crate::object::now_rfc3339()
}

/// The status upstream's naming and establishing controllers give a definition.
fn set_status(object: &mut Value, others: &[Arc<Value>], old: Option<&Value>) {
    let spec = object["spec"].clone();
    let group = spec["group"].as_str().unwrap_or_default();
    let names = &spec["names"];
    // Names another definition of the group has taken first: the plural (the name) cannot be,
    // the kind, singular and short names can.
    let mut conflict = None;
    for other in
        others.iter().filter(|o| o["spec"]["group"] == group && o["metadata"]["name"] != object["metadata"]["name"])
    {
        let taken = if other["status"]["acceptedNames"]["kind"].is_string() {
            &other["status"]["acceptedNames"]
        } else {
            &other["spec"]["names"]
        };
        let taken_names: Vec<&str> = ["plural", "singular"]
            .iter()
            .filter_map(|f| taken[*f].as_str())
            .chain(taken["shortNames"].as_array().into_iter().flatten().filter_map(Value::as_str))
            .collect();
        // Upstream names the taken name: `"widget" is already in use`.
        let ours = [&names["plural"], &names["singular"]].into_iter().filter_map(Value::as_str);
        let ours = ours.chain(names["shortNames"].as_array().into_iter().flatten().filter_map(Value::as_str));
        for name in ours {
            if taken_names.contains(&name) {
                conflict = Some(format!("{name:?} is already in use"));
            }
        }
        if taken["kind"] == names["kind"] {
            conflict = Some(format!("{:?} is already in use", names["kind"].as_str().unwrap_or("")));
        }
        if conflict.is_some() {
            break;
        }
    }
    let old_status = old.map(|o| &o["status"]);
    let transition = |kind: &str, status: &str| -> String {
        old_status
            .and_then(|s| s["conditions"].as_array())
            .and_then(|c| c.iter().find(|c| c["type"] == kind && c["status"] == status))
            .and_then(|c| c["lastTransitionTime"].as_str())
            .map(str::to_string)
            .unwrap_or_else(now)
    };
    let mut conditions = Vec::new();
    let mut status = json!({});
    match &conflict {
        None => {
            status["acceptedNames"] = names.clone();
            conditions.push(json!({"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                "message": "no conflicts found", "lastTransitionTime": transition("NamesAccepted", "True")}));
            conditions.push(json!({"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted", "lastTransitionTime": transition("Established", "True")}));
        }
        Some(message) => {
            // What was accepted before stays accepted.
            status["acceptedNames"] = old_status
                .map(|s| s["acceptedNames"].clone())
                .filter(|n| n.is_object())
                .unwrap_or_else(|| json!({"plural": "", "kind": ""}));
            conditions.push(json!({"type": "NamesAccepted", "status": "False", "reason": "NameConflict",
                "message": message, "lastTransitionTime": transition("NamesAccepted", "False")}));
            let established = old.is_some_and(|o| condition_true(o, "Established"));
            conditions.push(if established {
                json!({"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted", "lastTransitionTime": transition("Established", "True")})
            } else {
                json!({"type": "Established", "status": "False", "reason": "NotAccepted",
                    "message": "not all names are accepted", "lastTransitionTime": transition("Established", "False")})
            });
        }
    }
    if is_terminating(object) {
        conditions.push(json!({"type": "Terminating", "status": "True", "reason": "InstanceDeletionInProgress",
            "message": "CustomResource deletion is in progress", "lastTransitionTime": transition("Terminating", "True")}));
    }
    status["conditions"] = Value::Array(conditions);
    let mut stored: Vec<Value> = old_status.and_then(|s| s["storedVersions"].as_array()).cloned().unwrap_or_default();
    if let Some(storage) = storage_version(object)
        && !stored.iter().any(|v| v == &json!(storage))
    {
        stored.push(json!(storage));
    }
    status["storedVersions"] = Value::Array(stored);
    object["status"] = status;
}

/// A `JSONSchemaProps` in k8s-rs-pb's serde form (from a protobuf body) as its JSON: field
/// names as JSON Schema spells them (`$ref`, `x-kubernetes-…`), `JSON` values (`default`,
/// `example`, `enum`) parsed from their raw bytes, the either-or messages (`items`,
/// `additionalProperties`, `dependencies`) as the one they hold, and the zero values Go's
/// protobuf writes for its non-pointer fields dropped as its JSON omits them.
pub fn schema_from_protobuf(value: Value) -> Value {
    let Value::Object(map) = value else { return Value::Null };
    let mut out = serde_json::Map::new();
    let raw_json = |field: &Value| -> Option<Value> {
        let bytes: Vec<u8> = field["raw"].as_array()?.iter().filter_map(Value::as_u64).map(|b| b as u8).collect();
        serde_json::from_slice(&bytes).ok()
    };
    let schemas = |field: Value| -> Vec<Value> {
        match field {
            Value::Array(items) => items.into_iter().map(schema_from_protobuf).collect(),
            _ => Vec::new(),
        }
    };
    let schema_map = |field: Value| -> serde_json::Map<String, Value> {
        match field {
            Value::Object(map) => map.into_iter().map(|(k, v)| (k, schema_from_protobuf(v))).collect(),
            _ => serde_json::Map::new(),
        }
    };
    let or_bool = |field: Value| -> Value {
        if field["schema"].is_object() {
            schema_from_protobuf(field["schema"].clone())
        } else {
            json!(field["allows"].as_bool().unwrap_or(false))
        }
    };
    for (key, field) in map {
        if field.is_null() {
            continue;
        }
        let non_empty_string = |f: &Value| f.as_str().is_some_and(|s| !s.is_empty());
        match key.as_str() {
            "ref_" | "schema" | "type_" | "id" | "description" | "format" | "title" | "pattern"
                if non_empty_string(&field) =>
            {
                let name = match key.as_str() {
                    "ref_" => "$ref",
                    "schema" => "$schema",
                    "type_" => "type",
                    other => other,
                };
                out.insert(name.into(), field);
            }
            "default" | "example" => {
                if let Some(value) = raw_json(&field) {
                    out.insert(key, value);
                }
            }
            "enum_" => {
                let values: Vec<Value> = field.as_array().into_iter().flatten().filter_map(raw_json).collect();
                if !values.is_empty() {
                    out.insert("enum".into(), Value::Array(values));
                }
            }
            "items" => {
                if field["schema"].is_object() {
                    out.insert(key, schema_from_protobuf(field["schema"].clone()));
                } else {
                    let all = schemas(field["jSONSchemas"].clone());
                    if !all.is_empty() {
                        out.insert(key, Value::Array(all));
                    }
                }
            }
            "allOf" | "oneOf" | "anyOf" => {
                let all = schemas(field);
                if !all.is_empty() {
                    out.insert(key, Value::Array(all));
                }
            }
            "not" => {
                out.insert(key, schema_from_protobuf(field));
            }
            "properties" | "patternProperties" | "definitions" => {
                let all = schema_map(field);
                if !all.is_empty() {
                    out.insert(key, Value::Object(all));
                }
            }
            "additionalProperties" | "additionalItems" => {
                out.insert(key, or_bool(field));
            }
            "dependencies" => {
                let all: serde_json::Map<String, Value> = field
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, dependency)| {
                        let value = if dependency["schema"].is_object() {
                            schema_from_protobuf(dependency["schema"].clone())
                        } else {
                            dependency["property"].clone()
                        };
                        (name.clone(), value)
                    })
                    .collect();
                if !all.is_empty() {
                    out.insert(key, Value::Object(all));
                }
            }
            "externalDocs" => {
                let docs: serde_json::Map<String, Value> = field
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, v)| non_empty_string(v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !docs.is_empty() {
                    out.insert(key, Value::Object(docs));
                }
            }
            "required" | "xKubernetesListMapKeys" if field.as_array().is_some_and(|a| !a.is_empty()) => {
                let name = if key == "required" { "required" } else { "x-kubernetes-list-map-keys" };
                out.insert(name.into(), field);
            }
            "xKubernetesValidations" => {
                let rules: Vec<Value> = field
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|rule| {
                        let kept: serde_json::Map<String, Value> = rule
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(k, v)| {
                                !v.is_null()
                                    && (v.as_str() != Some(""))
                                    && !(k.as_str() == "optionalOldSelf" && **v == json!(false))
                            })
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        Value::Object(kept)
                    })
                    .collect();
                if !rules.is_empty() {
                    out.insert("x-kubernetes-validations".into(), Value::Array(rules));
                }
            }
            // Go's pointer fields: set means set, whatever the value.
            "maximum" | "minimum" | "maxLength" | "minLength" | "maxItems" | "minItems" | "maxProperties"
            | "minProperties" | "multipleOf" => {
                out.insert(key, field);
            }
            "xKubernetesPreserveUnknownFields" => {
                out.insert("x-kubernetes-preserve-unknown-fields".into(), field);
            }
            "xKubernetesListType" | "xKubernetesMapType" => {
                let name =
                    if key == "xKubernetesListType" { "x-kubernetes-list-type" } else { "x-kubernetes-map-type" };
                out.insert(name.into(), field);
            }
            // Plain bools: only `true` is written in JSON.
            "nullable"
            | "uniqueItems"
            | "exclusiveMaximum"
            | "exclusiveMinimum"
            | "xKubernetesEmbeddedResource"
            | "xKubernetesIntOrString"
                if field == json!(true) =>
            {
                let name = match key.as_str() {
                    "xKubernetesEmbeddedResource" => "x-kubernetes-embedded-resource",
                    "xKubernetesIntOrString" => "x-kubernetes-int-or-string",
                    other => other,
                };
                out.insert(name.into(), field);
            }
            _ => {}
        }
    }
    Value::Object(out)
}

// ---- custom resources: pruning, defaulting and validation by the structural schema ----

/// Drops the fields `object` has that its schema does not declare (upstream's pruning) and
/// returns their paths, for `fieldValidation`.
pub fn prune(custom: &Custom, object: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    let Some(map) = object.as_object_mut() else { return unknown };
    if let Some(metadata) = map.get_mut("metadata").filter(|m| m.is_object()) {
        unknown.extend(crate::schema::schemas().prune_metadata(metadata, "metadata"));
    }
    let Some(schema) = &custom.schema else { return unknown };
    let properties = schema["properties"].as_object();
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match properties.and_then(|p| p.get(&key)) {
            Some(property) => prune_value(property, map.get_mut(&key).expect("listed"), &key, &mut unknown),
            None if preserve => {}
            None => {
                map.remove(&key);
                unknown.push(key);
            }
        }
    }
    unknown
}

fn prune_value(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if schema["x-kubernetes-int-or-string"] == json!(true) {
        return;
    }
    match value {
        Value::Object(map) => {
            let embedded = schema["x-kubernetes-embedded-resource"] == json!(true);
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if properties.is_none() && additional.is_none() && (preserve || schema["type"] != "object") {
                return;
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = format!("{path}.{key}");
                if embedded && matches!(key.as_str(), "apiVersion" | "kind") {
                    continue;
                }
                if embedded && key == "metadata" {
                    if let Some(metadata) = map.get_mut("metadata").filter(|m| m.is_object()) {
                        unknown.extend(crate::schema::schemas().prune_metadata(metadata, &child_path));
                    }
                    continue;
                }
                let child_schema = properties.and_then(|p| p.get(&key)).or(additional);
                match child_schema {
                    Some(child) => prune_value(child, map.get_mut(&key).expect("listed"), &child_path, unknown),
                    None if preserve || schema.get("additionalProperties") == Some(&json!(true)) => {}
                    None => {
                        map.remove(&key);
                        unknown.push(child_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_value(item_schema, item, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Fills in the schema's `default`s where a field is absent.
pub fn default(custom: &Custom, object: &mut Value) {
    if let Some(schema) = &custom.schema {
        default_value(schema, object, true);
    }
}

fn default_value(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (key, property) in properties {
                    if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                        continue;
                    }
                    if !map.contains_key(key)
                        && let Some(default) = property.get("default")
                    {
                        map.insert(key.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(key) {
                        default_value(property, child, false);
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    default_value(additional, child, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for item in items {
                    default_value(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

/// Validates a custom object against its schema: the causes of a 422, with upstream's wording.
/// Once it fits, its CEL rules (`x-kubernetes-validations`) run, `old` being the object before
/// an update. On an update, values left as they were are not judged again (ratcheting).
pub fn validate(custom: &Custom, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(schema) = &custom.schema {
        let mut top = schema.clone();
        // The server validates metadata itself.
        if let Some(properties) = top["properties"].as_object_mut() {
            properties.remove("metadata");
            properties.remove("apiVersion");
            properties.remove("kind");
        }
        validate_value(&top, object, old, "", &mut causes);
        if causes.is_empty() {
            causes = crate::rules::check(schema, object, old);
        }
    }
    causes
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn short(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// `maxItems` / `maxProperties`: more than the schema allows.
fn too_many(schema: &Value, limit: &str, count: usize, field: &str, causes: &mut Vec<Cause>) {
    if let Some(max) = schema[limit].as_u64()
        && count as u64 > max
    {
        causes.push(cause("FieldValueTooMany", field, format!("Too many: {count}: must have at most {max} items")));
    }
}

/// A schema's `pattern`, compiled once per process (None if it is not a valid expression).
fn compiled(pattern: &str) -> Option<regex::Regex> {
    static CACHE: Mutex<Option<HashMap<String, Option<regex::Regex>>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    cache.entry(pattern.to_string()).or_insert_with(|| regex::Regex::new(pattern).ok()).clone()
}

/// Validates `value` against `schema`. `old` is the value at the same place before an update,
/// where one can be found (by property name, and by the keys of a `map` list's items): as
/// upstream's validation ratcheting, a value an update leaves as it was is not judged again,
/// so tightening a schema does not lock its existing objects.
fn validate_value(schema: &Value, value: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    if old == Some(value) {
        return;
    }
    let field = if path.is_empty() { "<root>".to_string() } else { path.to_string() };
    let actual = type_name(value);
    if value.is_null() {
        if schema["nullable"] != json!(true) && schema["type"].is_string() {
            let expected = schema["type"].as_str().unwrap_or_default();
            causes.push(cause(
                "FieldValueTypeInvalid",
                &field,
                format!("Invalid value: \"null\": {field} in body must be of type {expected}: \"null\""),
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == json!(true) {
        if !matches!(actual, "integer" | "string") {
            causes.push(cause(
                "FieldValueTypeInvalid",
                &field,
                format!("Invalid value: {actual:?}: {field} in body must be of type integer-or-string: {actual:?}"),
            ));
        }
        return;
    }
    if let Some(expected) = schema["type"].as_str() {
        let fits = expected == actual || (expected == "number" && actual == "integer");
        if !fits {
            causes.push(cause(
                "FieldValueTypeInvalid",
                &field,
                format!("Invalid value: {actual:?}: {field} in body must be of type {expected}: {actual:?}"),
            ));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(short).collect();
        causes.push(cause(
            "FieldValueNotSupported",
            &field,
            format!("Unsupported value: {}: supported values: {}", short(value), list.join(", ")),
        ));
    }
    match value {
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(max) = schema["maximum"].as_f64() {
                let exclusive = schema["exclusiveMaximum"] == json!(true);
                if n > max || (exclusive && n == max) {
                    let word = if exclusive { "less than" } else { "less than or equal to" };
                    causes.push(cause(
                        "FieldValueInvalid",
                        &field,
                        format!("Invalid value: {value}: {field} in body should be {word} {}", schema["maximum"]),
                    ));
                }
            }
            if let Some(min) = schema["minimum"].as_f64() {
                let exclusive = schema["exclusiveMinimum"] == json!(true);
                if n < min || (exclusive && n == min) {
                    let word = if exclusive { "greater than" } else { "greater than or equal to" };
                    causes.push(cause(
                        "FieldValueInvalid",
                        &field,
                        format!("Invalid value: {value}: {field} in body should be {word} {}", schema["minimum"]),
                    ));
                }
            }
        }
        Value::String(s) => {
            let length = s.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64()
                && length > max
            {
                causes.push(cause("FieldValueTooLong", &field, format!("Too long: may not be more than {max} bytes")));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && length < min
            {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    format!("Invalid value: {s:?}: {field} in body should be at least {min} chars long"),
                ));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && compiled(pattern).is_some_and(|regex| !regex.is_match(s))
            {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    format!("Invalid value: {s:?}: {field} in body should match '{pattern}'"),
                ));
            }
        }
        Value::Array(items) => {
            too_many(schema, "maxItems", items.len(), &field, causes);
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    format!("Invalid value: {}: {field} in body should have at least {min} items", items.len()),
                ));
            }
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                let old_items = old.and_then(Value::as_array);
                for (i, item) in items.iter().enumerate() {
                    let old_item = old_items.and_then(|olds| correlated(schema, item, olds));
                    validate_value(item_schema, item, old_item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::Object(map) => {
            let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(required) {
                    causes.push(cause("FieldValueRequired", &join(required), "Required value"));
                }
            }
            too_many(schema, "maxProperties", map.len(), &field, causes);
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    validate_value(child_schema, child, old.and_then(|o| o.get(key)), &join(key), causes);
                }
            }
        }
        _ => {}
    }
}

/// The item of `olds` (the list before an update) that `item` stands for: in a list of
/// `x-kubernetes-list-type: map`, the one with the same map keys; items of other lists have none.
pub fn correlated<'a>(list_schema: &Value, item: &Value, olds: &'a [Value]) -> Option<&'a Value> {
    if list_schema["x-kubernetes-list-type"] != "map" {
        return None;
    }
    let keys: Vec<&str> =
        list_schema["x-kubernetes-list-map-keys"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if keys.is_empty() {
        return None;
    }
    olds.iter().find(|o| keys.iter().all(|k| o.get(*k) == item.get(*k)))
}

/// A printer column's cell: the value at its JSONPath (`.spec.replicas`, `.status.conditions[0].type`).
pub fn column_value(column: &PrinterColumn, object: &Value) -> Value {
    let value = json_path(object, &column.json_path);
    match value {
        None => Value::Null,
        Some(value) if column.kind == "date" => match value.as_str() {
            Some(timestamp) => json!(crate::table::age_of(timestamp)),
            None => Value::Null,
        },
        Some(Value::Array(items)) => json!(
            items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        ),
        Some(Value::Object(map)) => json!(Value::Object(map.clone()).to_string()),
        Some(value) => value.clone(),
    }
}

/// Sets the field a simple dotted path (`.spec.replicas`) names, making the objects on the way.
pub fn set_path(object: &mut Value, path: &str, value: Value) {
    let mut current = object;
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if !current.is_object() {
            *current = json!({});
        }
        if i == parts.len() - 1 {
            current[*part] = value;
            return;
        }
        current = &mut current[*part];
    }
}

/// Follows a simple JSONPath (`.a.b[0].c`, with or without the braces kubectl allows).
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}').trim_start_matches('$');
    let mut current = object;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            current = current.get(key)?;
        }
        for index in indices.split('[').filter(|i| !i.is_empty()) {
            let index: usize = index.trim_end_matches(']').parse().ok()?;
            current = current.get(index)?;
        }
    }
    Some(current)
}

/// The group versions the served custom resources add, each group's versions in upstream's
/// priority order (GA before beta before alpha, higher numbers first).
pub fn version_priority(a: &str, b: &str) -> std::cmp::Ordering {
    fn parse(v: &str) -> Option<(u64, u8, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: u64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((major, 3, 0));
        }
        let (stage, number) = if let Some(n) = tail.strip_prefix("beta") {
            (2, n)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (1, n)
        } else {
            return None;
        };
        Some((major, stage, number.parse().ok()?))
    }
    match (parse(a), parse(b)) {
        (Some((ma, sa, na)), Some((mb, sb, nb))) => sb.cmp(&sa).then(mb.cmp(&ma)).then(nb.cmp(&na)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wg"]},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "required": ["size"], "properties": {
                            "size": {"type": "integer", "minimum": 1, "maximum": 10},
                            "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                        }},
                    }}},
                }],
            },
        })
    }

    #[test]
    fn a_valid_definition_is_established_with_defaults_and_the_cleanup_finalizer() {
        let mut object = crd();
        prepare(&mut object, &[], None).unwrap();
        assert_eq!(object["spec"]["names"]["singular"], "widget");
        assert_eq!(object["spec"]["names"]["listKind"], "WidgetList");
        assert_eq!(object["spec"]["conversion"]["strategy"], "None");
        assert_eq!(object["metadata"]["finalizers"], json!([CLEANUP_FINALIZER]));
        assert!(condition_true(&object, "Established"));
        assert_eq!(object["status"]["storedVersions"], json!(["v1"]));
        let resources = resources_of(&object);
        assert_eq!(resources.len(), 1);
        assert_eq!(resources[0].storage, "example.com/widgets");
        assert_eq!(resources[0].short_names, ["wg"]);
        // Interned: the same definition makes the same resource.
        assert!(std::ptr::eq(resources[0], resources_of(&object)[0]));
    }

    #[test]
    fn a_definition_whose_name_does_not_match_is_refused_with_the_field() {
        let mut object = crd();
        object["metadata"]["name"] = json!("gadgets.example.com");
        object["spec"]["versions"][0]["storage"] = json!(false);
        let error = prepare(&mut object, &[], None).unwrap_err();
        assert_eq!(error.code, 422);
        let fields: Vec<&str> = error.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["metadata.name", "spec.versions"]);
    }

    #[test]
    fn a_kind_taken_in_the_group_is_not_accepted() {
        let mut first = crd();
        prepare(&mut first, &[], None).unwrap();
        let mut second = crd();
        second["metadata"]["name"] = json!("gizmos.example.com");
        second["spec"]["names"] = json!({"plural": "gizmos", "kind": "Widget"});
        prepare(&mut second, &[Arc::new(first)], None).unwrap();
        assert!(!condition_true(&second, "Established"));
        assert!(resources_of(&second).is_empty());
    }

    #[test]
    fn objects_are_pruned_defaulted_and_validated_by_the_schema() {
        let mut object = crd();
        prepare(&mut object, &[], None).unwrap();
        let custom = resources_of(&object)[0].custom.unwrap();
        let mut widget = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 11, "extra": true}, "other": 1});
        let unknown = prune(custom, &mut widget);
        assert_eq!(unknown, ["other", "spec.extra"]);
        default(custom, &mut widget);
        assert_eq!(widget["spec"]["color"], "red");
        let causes = validate(custom, &widget, None);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.size");
        assert_eq!(causes[0].message, "Invalid value: 11: spec.size in body should be less than or equal to 10");
        let causes = validate(custom, &json!({"spec": {"size": "big", "color": "green"}}), None);
        let messages: Vec<&str> = causes.iter().map(|c| c.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "Unsupported value: \"green\": supported values: \"red\", \"blue\"",
                "Invalid value: \"string\": spec.size in body must be of type integer: \"string\"",
            ]
        );
        assert_eq!(validate(custom, &json!({"spec": {}}), None)[0].field, "spec.size");
    }

    #[test]
    fn versions_sort_as_upstream_prefers_them() {
        let mut versions = vec!["v1alpha1", "v2beta1", "v1", "v1beta2", "v2", "foo"];
        versions.sort_by(|a, b| version_priority(a, b));
        assert_eq!(versions, ["v2", "v1", "v2beta1", "v1beta2", "v1alpha1", "foo"]);
    }

    #[test]
    fn printer_columns_follow_json_paths() {
        let object = json!({"spec": {"items": [{"name": "a"}], "size": 3}});
        assert_eq!(json_path(&object, ".spec.items[0].name"), Some(&json!("a")));
        assert_eq!(json_path(&object, "{.spec.size}"), Some(&json!(3)));
        assert_eq!(json_path(&object, ".spec.missing"), None);
    }
}
