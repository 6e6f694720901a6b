//! Static pods: manifests in `--pod-manifest-path` (default `<data-dir>/manifests`), as
//! kubeadm's control plane pods are. Each file (YAML or JSON, one Pod) becomes a mirror pod
//! named `<name>-<node>` bound to this node, annotated `kubernetes.io/config.source: file`,
//! `kubernetes.io/config.hash` and `kubernetes.io/config.mirror`, owned by the Node — and the
//! kubelet runs it like any pod bound to it. A changed file replaces the pod; a removed file
//! deletes it; a mirror pod deleted by someone is made again. A manifest that does not parse
//! is skipped with a warning (once per content).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::pods::Shared;

pub const SOURCE: &str = "kubernetes.io/config.source";
pub const HASH: &str = "kubernetes.io/config.hash";
pub const MIRROR: &str = "kubernetes.io/config.mirror";

/// How often the directory is read again (upstream: fileCheckFrequency, 20 s).
const PERIOD: Duration = Duration::from_secs(2);

/// The mirror pods the manifests in `dir` call for, by name; files that do not parse are
/// returned apart with the reason.
pub fn desired(dir: &Path, node: &str, node_uid: &str) -> (BTreeMap<String, Value>, Vec<(PathBuf, String)>) {
    let mut pods = BTreeMap::new();
    let mut bad = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return (pods, bad) };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json")) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        match mirror(&text, node, node_uid) {
            Ok(pod) => {
                let key = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
                pods.insert(key, pod);
            }
            Err(why) => bad.push((path, why)),
        }
    }
    (pods, bad)
}

/// The mirror pod of one manifest.
pub fn mirror(text: &str, node: &str, node_uid: &str) -> Result<Value, String> {
    let mut pod: Value = serde_saphyr::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    if pod["kind"] != "Pod" {
        return Err(format!("kind {} is not Pod", pod["kind"]));
    }
    let typed: Pod = serde_json::from_value(pod.clone()).map_err(|e| format!("not a Pod: {e}"))?;
    let name = typed.metadata.name.filter(|n| !n.is_empty()).ok_or("the pod has no name")?;
    if typed.spec.as_ref().is_none_or(|s| s.containers.is_empty()) {
        return Err("the pod has no containers".into());
    }
    let hash: String = Sha256::digest(text.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
    let metadata = &mut pod["metadata"];
    metadata["name"] = json!(format!("{name}-{node}"));
    if !metadata["namespace"].is_string() {
        metadata["namespace"] = json!("default");
    }
    for field in ["uid", "resourceVersion", "creationTimestamp"] {
        if let Some(object) = metadata.as_object_mut() {
            object.remove(field);
        }
    }
    if !metadata["annotations"].is_object() {
        metadata["annotations"] = json!({});
    }
    metadata["annotations"][SOURCE] = json!("file");
    metadata["annotations"][HASH] = json!(hash);
    metadata["annotations"][MIRROR] = json!(hash);
    metadata["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid, "controller": true}]);
    pod["spec"]["nodeName"] = json!(node);
    if let Some(object) = pod.as_object_mut() {
        object.remove("status");
    }
    Ok(pod)
}

/// Keeps the mirror pods in step with the manifests until the process ends.
pub async fn run(node: Shared, dir: PathBuf) {
    let _ = std::fs::create_dir_all(&dir);
    let nodes: Api<Node> = Api::all(node.client.clone());
    let pods: Api<Pod> = Api::all(node.client.clone());
    let mut warned: HashSet<(PathBuf, String)> = HashSet::new();
    loop {
        if let Err(error) = sync(&node, &dir, &nodes, &pods, &mut warned).await {
            tracing::debug!(%error, "static pods");
        }
        tokio::time::sleep(PERIOD).await;
    }
}

async fn sync(
    node: &Shared,
    dir: &Path,
    nodes: &Api<Node>,
    pods: &Api<Pod>,
    warned: &mut HashSet<(PathBuf, String)>,
) -> anyhow::Result<()> {
    let uid = nodes.get(&node.name).await?.metadata.uid.unwrap_or_default();
    let (wanted, bad) = desired(dir, &node.name, &uid);
    for (path, why) in bad {
        if warned.insert((path.clone(), why.clone())) {
            tracing::warn!(manifest = %path.display(), %why, "a static pod manifest is skipped");
        }
    }
    let list = pods.list(&ListParams::default().fields(&format!("spec.nodeName={}", node.name))).await?;
    let mut existing: BTreeMap<(String, String), (String, bool)> = BTreeMap::new();
    for pod in list.items {
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        if annotations.get(SOURCE).map(String::as_str) != Some("file") {
            continue;
        }
        let key = (pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
        existing.insert(
            key,
            (annotations.get(HASH).cloned().unwrap_or_default(), pod.metadata.deletion_timestamp.is_some()),
        );
    }
    let mut keep = HashSet::new();
    for (name, pod) in &wanted {
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        let hash = pod["metadata"]["annotations"][HASH].as_str().unwrap_or_default().to_string();
        keep.insert((namespace.clone(), name.clone()));
        let api: Api<Pod> = Api::namespaced(node.client.clone(), &namespace);
        match existing.get(&(namespace.clone(), name.clone())) {
            Some((current, _)) if *current == hash => {}
            // Being deleted (a changed manifest, or someone deleted it): made again once gone.
            Some((_, true)) => {}
            Some((_, false)) => {
                api.delete(name, &DeleteParams::default()).await?;
            }
            None => {
                let typed: Pod = serde_json::from_value(pod.clone())?;
                match api.create(&PostParams::default(), &typed).await {
                    Ok(_) => tracing::info!(pod = %name, "static pod mirrored"),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(error) => tracing::warn!(pod = %name, %error, "could not create a mirror pod"),
                }
            }
        }
    }
    for ((namespace, name), (_, deleting)) in existing {
        if !deleting && !keep.contains(&(namespace.clone(), name.clone())) {
            let api: Api<Pod> = Api::namespaced(node.client.clone(), &namespace);
            api.delete(&name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_become_mirror_pods_of_the_node() {
        let pod = mirror(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {tier: cp}}\nspec: {containers: [{name: c, image: x:1}]}\n",
            "n1",
            "uid-1",
        )
        .unwrap();
        assert_eq!(pod["metadata"]["name"], "web-n1");
        assert_eq!(pod["metadata"]["namespace"], "default");
        assert_eq!(pod["spec"]["nodeName"], "n1");
        assert_eq!(pod["metadata"]["annotations"][SOURCE], "file");
        assert_eq!(pod["metadata"]["annotations"][HASH].as_str().unwrap().len(), 16);
        assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(pod["metadata"]["labels"]["tier"], "cp");
        assert!(mirror("kind: Service\nmetadata: {name: s}\n", "n1", "u").unwrap_err().contains("not Pod"));
        assert!(
            mirror("kind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n", "n1", "u")
                .unwrap_err()
                .contains("no containers")
        );
        assert!(mirror(": : :\n", "n1", "u").is_err());
    }

    #[test]
    fn the_directory_is_read_and_bad_files_are_set_apart() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "kind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, image: x:1}]}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("b.json"), r#"{"kind": "Pod", "metadata": {"name": "b", "namespace": "kube-system"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}"#).unwrap();
        std::fs::write(dir.path().join("broken.yaml"), "kind: Pod\nmetadata: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let (pods, bad) = desired(dir.path(), "n", "u");
        assert_eq!(pods.keys().collect::<Vec<_>>(), ["a-n", "b-n"]);
        assert_eq!(pods["b-n"]["metadata"]["namespace"], "kube-system");
        assert_eq!(bad.len(), 1);
        assert!(bad[0].0.ends_with("broken.yaml"));
    }
}
