//! The custom resources this server serves now: kept from the CustomResourceDefinitions'
//! changes, one at a time, as interned [`Resource`]s like the built-in ones (one definition
//! version's resource is made once and kept for the life of the process, so a definition
//! created again costs nothing more).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tugboat_store::{EventKind, Revision};

use crate::custom::version_priority;
use crate::registry::{self, Resource};
use crate::registry::{Custom, PrinterColumn, ScalePaths};
use crate::watch_cache::Change;

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

impl Default for CustomResources {
    fn default() -> CustomResources {
        CustomResources { served: Default::default(), revision: tokio::sync::watch::Sender::new(0) }
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

pub(crate) fn storage_version(crd: &Value) -> Option<String> {
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["storage"] == json!(true))
        .and_then(|v| v["name"].as_str())
        .map(str::to_string)
}

pub(crate) fn condition_true(crd: &Value, kind: &str) -> bool {
    crd["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| conditions.iter().any(|c| c["type"] == kind && c["status"] == "True"))
}

pub(crate) fn is_terminating(crd: &Value) -> bool {
    crd["metadata"]["deletionTimestamp"].is_string()
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
pub(crate) fn resources_of(crd: &Value) -> Vec<&'static Resource> {
    // By a digest of what the version's resource is made from (not that text itself: with its
    // schema it is kilobytes, and kept for the life of the process).
    static INTERNED: Mutex<Option<HashMap<[u8; 32], &'static Resource>>> = Mutex::new(None);
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
        let identity: [u8; 32] =
            ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref().try_into().expect("32 bytes");
        let mut interned = INTERNED.lock().unwrap_or_else(|e| e.into_inner());
        let interned = interned.get_or_insert_with(Default::default);
        if let Some(resource) = interned.get(&identity) {
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
            schema: version["schema"].get("openAPIV3Schema").map(registry::CustomSchema::new),
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
        interned.insert(identity, resource);
        served.push(resource);
    }
    served
}
