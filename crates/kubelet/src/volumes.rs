//! Volumes whose content comes from the API: configMap, secret, downwardAPI and projected
//! (configMap, secret, downwardAPI and serviceAccountToken sources). Their files are written
//! as upstream's atomic writer lays them out: the files live in a timestamped directory,
//! `..data` points at it, and every visible name is a link through `..data`, so a container
//! sees either the old set of files or the new one, never a mix.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume, VolumeProjection};
use kube::Api;

/// One file of a volume: its path inside the volume, its bytes, its mode.
pub type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn check_path(path: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !path.is_empty() && !path.starts_with('/') && !path.split('/').any(|p| p == ".." || p.starts_with("..")),
        "invalid path {path:?} in a volume"
    );
    Ok(())
}

/// The files of a key → value source (`items` pick and rename keys; default: every key).
pub fn from_data(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    what: &str,
    optional: bool,
) -> anyhow::Result<Files> {
    let mut files = Files::new();
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                match data.get(&item.key) {
                    Some(value) => {
                        check_path(&item.path)?;
                        let mode = item.mode.map(|m| m as u32).unwrap_or(default_mode);
                        files.insert(item.path.clone(), (value.clone(), mode));
                    }
                    None if optional => {}
                    None => anyhow::bail!("configmap references non-existent config key: {} ({what})", item.key),
                }
            }
        }
        _ => {
            for (key, value) in data {
                check_path(key)?;
                files.insert(key.clone(), (value.clone(), default_mode));
            }
        }
    }
    Ok(files)
}

/// A `metadata.*` field of the pod as the downward API renders it (env and volumes alike);
/// `metadata.labels` / `metadata.annotations` whole (`key="value"` lines) only in volumes.
pub fn metadata_field(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let map = |m: &Option<BTreeMap<String, String>>| {
        let lines: Vec<String> = m
            .iter()
            .flatten()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
            .collect();
        lines.join("\n")
    };
    let keyed = |prefix: &str| path.strip_prefix(prefix).and_then(|k| k.strip_suffix("']")).map(str::to_string);
    Some(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => map(&meta.labels),
        "metadata.annotations" => map(&meta.annotations),
        _ => {
            if let Some(key) = keyed("metadata.labels['") {
                meta.labels.as_ref().and_then(|l| l.get(&key)).cloned().unwrap_or_default()
            } else if let Some(key) = keyed("metadata.annotations['") {
                meta.annotations.as_ref().and_then(|l| l.get(&key)).cloned().unwrap_or_default()
            } else {
                return None;
            }
        }
    })
}

fn field(pod: &Pod, path: &str) -> anyhow::Result<String> {
    metadata_field(pod, path).ok_or_else(|| anyhow::anyhow!("unsupported downward API field {path:?}"))
}

/// The files of downward API items.
/// A limit a container does not set is the node's `allocatable` (given when an item asks).
pub fn downward(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
    allocatable: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> anyhow::Result<Files> {
    let mut files = Files::new();
    for item in items {
        check_path(&item.path)?;
        let value = if let Some(f) = &item.field_ref {
            field(pod, &f.field_path)?
        } else if let Some(r) = &item.resource_field_ref {
            crate::pods::resource_value(pod, r.container_name.as_deref(), None, r, allocatable)?
        } else {
            anyhow::bail!("downward API item {:?} has no source", item.path)
        };
        files.insert(item.path.clone(), (value.into_bytes(), item.mode.map(|m| m as u32).unwrap_or(default_mode)));
    }
    Ok(files)
}

async fn config_map(api: &Api<ConfigMap>, name: &str, optional: bool) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    match api.get_opt(name).await? {
        Some(cm) => {
            let mut data: BTreeMap<String, Vec<u8>> =
                cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            data.extend(cm.binary_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
            Ok(data)
        }
        None if optional => Ok(BTreeMap::new()),
        None => anyhow::bail!("configmap {name:?} not found"),
    }
}

async fn secret(api: &Api<Secret>, name: &str, optional: bool) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    match api.get_opt(name).await? {
        Some(s) => {
            let mut data: BTreeMap<String, Vec<u8>> =
                s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
            data.extend(s.string_data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())));
            Ok(data)
        }
        None if optional => Ok(BTreeMap::new()),
        None => anyhow::bail!("secret {name:?} not found"),
    }
}

/// The files an API-backed volume holds now, or None for other kinds of volume. With
/// `written` (the volume's directory, on a refresh), a service account token already there is
/// kept rather than asked for again.
pub async fn files(
    client: &kube::Client,
    pod: &Pod,
    volume: &Volume,
    written: Option<&Path>,
) -> anyhow::Result<Option<Files>> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(cm) = &volume.config_map {
        let optional = cm.optional.unwrap_or(false);
        let data = config_map(&configmaps, &cm.name, optional).await?;
        let mode = cm.default_mode.unwrap_or(0o644) as u32;
        return from_data(&data, cm.items.as_ref(), mode, &cm.name, optional).map(Some);
    }
    if let Some(s) = &volume.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let optional = s.optional.unwrap_or(false);
        let data = secret(&secrets, &name, optional).await?;
        let mode = s.default_mode.unwrap_or(0o644) as u32;
        return from_data(&data, s.items.as_ref(), mode, &name, optional).map(Some);
    }
    if let Some(d) = &volume.downward_api {
        let mode = d.default_mode.unwrap_or(0o644) as u32;
        let items = d.items.as_deref().unwrap_or_default();
        let allocatable = node_allocatable(client, pod, items).await;
        return downward(pod, items, mode, allocatable.as_ref()).map(Some);
    }
    if let Some(p) = &volume.projected {
        let mode = p.default_mode.unwrap_or(0o644) as u32;
        let mut all = Files::new();
        for source in p.sources.iter().flatten() {
            all.extend(projection(client, pod, source, mode, &configmaps, &secrets, written).await?);
        }
        return Ok(Some(all));
    }
    Ok(None)
}

/// The allocatable resources of the pod's node, when one of `items` asks for a resource.
async fn node_allocatable(
    client: &kube::Client,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
) -> Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>> {
    if !items.iter().any(|i| i.resource_field_ref.is_some()) {
        return None;
    }
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes.get(&node).await.ok()?.status?.allocatable
}

async fn projection(
    client: &kube::Client,
    pod: &Pod,
    source: &VolumeProjection,
    mode: u32,
    configmaps: &Api<ConfigMap>,
    secrets: &Api<Secret>,
    written: Option<&Path>,
) -> anyhow::Result<Files> {
    if let Some(cm) = &source.config_map {
        let optional = cm.optional.unwrap_or(false);
        let data = config_map(configmaps, &cm.name, optional).await?;
        return from_data(&data, cm.items.as_ref(), mode, &cm.name, optional);
    }
    if let Some(s) = &source.secret {
        let optional = s.optional.unwrap_or(false);
        let data = secret(secrets, &s.name, optional).await?;
        return from_data(&data, s.items.as_ref(), mode, &s.name, optional);
    }
    if let Some(d) = &source.downward_api {
        let items = d.items.as_deref().unwrap_or_default();
        let allocatable = node_allocatable(client, pod, items).await;
        return downward(pod, items, mode, allocatable.as_ref());
    }
    if let Some(t) = &source.service_account_token {
        check_path(&t.path)?;
        let token = match written.and_then(|dir| std::fs::read(dir.join(&t.path)).ok()) {
            Some(token) => token,
            None => service_account_token(client, pod, t.audience.as_deref(), t.expiration_seconds).await?.into_bytes(),
        };
        let mut files = Files::new();
        files.insert(t.path.clone(), (token, mode));
        return Ok(files);
    }
    Ok(Files::new())
}

/// A token for the pod's service account, from the TokenRequest API, bound to the pod.
async fn service_account_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> anyhow::Result<String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": audience.map(|a| vec![a]).unwrap_or_default(),
                 "expirationSeconds": expiration.unwrap_or(3607),
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid}},
    });
    let path = format!("/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token");
    let http =
        http::Request::post(path).header("Content-Type", "application/json").body(serde_json::to_vec(&request)?)?;
    let response: serde_json::Value = client
        .request(http)
        .await
        .map_err(|e| anyhow::anyhow!("requesting a token for service account {namespace}/{account}: {e}"))?;
    response["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("the TokenRequest gave no token"))
}

/// Writes `files` into `dir` atomically (see the module's comment). Returns whether anything
/// changed.
pub fn write(dir: &Path, files: &Files) -> anyhow::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let current = dir.join("..data");
    if let Ok(target) = std::fs::read_link(&current)
        && read_back(&dir.join(&target)).ok().as_ref() == Some(files)
    {
        return Ok(false);
    }
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
    );
    let fresh = dir.join(&stamp);
    for (path, (bytes, mode)) in files {
        let file = fresh.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, bytes)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode & 0o7777))?;
    }
    std::fs::create_dir_all(&fresh)?;
    let link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&stamp, &link)?;
    std::fs::rename(&link, &current)?;
    // Visible names: one link per top-level entry, through ..data.
    let mut top: Vec<String> = files.keys().map(|p| p.split('/').next().unwrap_or(p).to_string()).collect();
    top.dedup();
    for name in &top {
        let visible = dir.join(name);
        if std::fs::symlink_metadata(&visible).is_err() {
            std::os::unix::fs::symlink(PathBuf::from("..data").join(name), &visible)?;
        }
    }
    // What is gone: old timestamped dirs and links of removed keys.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("..") && name != "..data" && name != stamp {
            let _ = std::fs::remove_dir_all(entry.path());
        } else if !name.starts_with("..") && !top.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(true)
}

fn read_back(dir: &Path) -> std::io::Result<Files> {
    let mut files = Files::new();
    fn walk(root: &Path, dir: &Path, files: &mut Files) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(root, &path, files)?;
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().to_string();
                let mode = entry.metadata()?.permissions().mode() & 0o7777;
                files.insert(rel, (std::fs::read(&path)?, mode));
            }
        }
        Ok(())
    }
    walk(dir, dir, &mut files)?;
    Ok(files)
}

/// The provisioner (and CSI driver) of the built-in `local-path` storage class.
pub const LOCAL_PATH: &str = "tugboat.dev/local-path";

/// Where the volume bound to claim `name` lives on this node: a `hostPath` or `local`
/// volume's path, or for a `local-path` volume a directory under the kubelet's data dir (made
/// on first use). An unbound claim is an error the pod waits on.
pub async fn claim_path(node: &crate::pods::NodeAgent, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(node.client.clone(), namespace);
    let claim =
        claims.get_opt(name).await?.ok_or_else(|| anyhow::anyhow!("persistentvolumeclaim {name:?} not found"))?;
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let volume = claim.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|_| bound);
    let Some(volume) = volume else {
        anyhow::bail!("persistentvolumeclaim {name:?} is not bound yet");
    };
    let pv = Api::<PersistentVolume>::all(node.client.clone()).get(&volume).await?;
    let spec = pv.spec.unwrap_or_default();
    // A volume kept on another node (a pod bound there by hand, or before the volume was):
    // refuse rather than hand the pod an empty directory.
    if let Some(terms) = spec.node_affinity.as_ref().and_then(|a| a.required.as_ref()).map(|r| &r.node_selector_terms) {
        let here = terms.iter().any(|term| {
            term.match_expressions
                .iter()
                .flatten()
                .filter(|e| e.key == "kubernetes.io/hostname")
                .all(|e| e.operator == "In" && e.values.iter().flatten().any(|v| *v == node.name))
        });
        anyhow::ensure!(here, "volume {volume} is on another node (volume node affinity conflict)");
    }
    let path = if let Some(host) = spec.host_path {
        let path = PathBuf::from(host.path);
        if !path.exists() && matches!(host.type_.as_deref(), None | Some("" | "DirectoryOrCreate")) {
            std::fs::create_dir_all(&path)?;
        }
        path
    } else if let Some(local) = spec.local {
        PathBuf::from(local.path)
    } else if let Some(csi) = spec.csi.filter(|c| c.driver == LOCAL_PATH) {
        anyhow::ensure!(
            !csi.volume_handle.contains('/') && !csi.volume_handle.starts_with('.'),
            "volume {volume}: bad handle {:?}",
            csi.volume_handle
        );
        let path = node.pods_dir.with_file_name("storage").join(&csi.volume_handle);
        if !path.exists() {
            std::fs::create_dir_all(&path)?;
            std::fs::set_permissions(&path, PermissionsExt::from_mode(0o777))?;
        }
        path
    } else {
        anyhow::bail!("volume {volume}: only hostPath, local and local-path volumes can be mounted so far");
    };
    anyhow::ensure!(path.exists(), "volume {volume}: {} does not exist on this node", path.display());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_pick_keys_and_paths_stay_inside() {
        let data: BTreeMap<String, Vec<u8>> =
            [("a".to_string(), b"1".to_vec()), ("b".to_string(), b"2".to_vec())].into();
        let all = from_data(&data, None, 0o644, "cm", false).unwrap();
        assert_eq!(all.len(), 2);
        let items = vec![KeyToPath { key: "b".into(), path: "dir/bee".into(), mode: Some(0o600) }];
        let picked = from_data(&data, Some(&items), 0o644, "cm", false).unwrap();
        assert_eq!(picked.get("dir/bee"), Some(&(b"2".to_vec(), 0o600)));
        let missing = vec![KeyToPath { key: "z".into(), path: "z".into(), mode: None }];
        assert!(from_data(&data, Some(&missing), 0o644, "cm", false).is_err());
        assert!(from_data(&data, Some(&missing), 0o644, "cm", true).unwrap().is_empty());
        let escape = vec![KeyToPath { key: "a".into(), path: "../etc/passwd".into(), mode: None }];
        assert!(from_data(&data, Some(&escape), 0o644, "cm", false).is_err());
    }

    #[test]
    fn writes_are_atomic_swaps_through_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Files::new();
        files.insert("a".into(), (b"1".to_vec(), 0o644));
        files.insert("sub/b".into(), (b"2".to_vec(), 0o600));
        assert!(write(dir.path(), &files).unwrap());
        assert_eq!(std::fs::read_to_string(dir.path().join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(dir.path().join("sub/b")).unwrap(), "2");
        assert!(!write(dir.path(), &files).unwrap(), "unchanged: nothing written");
        files.remove("a");
        files.insert("sub/b".into(), (b"3".to_vec(), 0o600));
        assert!(write(dir.path(), &files).unwrap());
        assert!(!dir.path().join("a").exists());
        assert_eq!(std::fs::read_to_string(dir.path().join("sub/b")).unwrap(), "3");
        let olds = std::fs::read_dir(dir.path()).unwrap().filter(|e| {
            let n = e.as_ref().unwrap().file_name().to_string_lossy().to_string();
            n.starts_with("..") && n != "..data"
        });
        assert_eq!(olds.count(), 1, "only the current timestamped dir is kept");
    }

    #[test]
    fn downward_api_files_show_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "web", "tier": "x"}},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {"memory": "64Mi"}}}]}}))
        .unwrap();
        let items: Vec<DownwardAPIVolumeFile> = serde_json::from_value(serde_json::json!([
            {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "mem", "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}]))
        .unwrap();
        let files = downward(&pod, &items, 0o644, None).unwrap();
        assert_eq!(files["name"].0, b"p");
        assert_eq!(String::from_utf8_lossy(&files["labels"].0), "app=\"web\"\ntier=\"x\"");
        assert_eq!(files["mem"].0, b"64");
    }
}
