//! The image store: a content-addressed blob store, the names that point into it, and every
//! layer unpacked once into a directory of its own, ready to be an overlayfs lower dir.
//!
//! Layout under the store's root:
//! - `blobs/sha256/<hex>`: manifests, configs and (compressed) layers, as a registry serves them;
//! - `layers/<hex of the diff id>/`: a layer unpacked, whiteouts turned into overlayfs ones;
//! - `images.json`: name → [`Image`] (manifest digest, config, diff ids, pinned).
//!
//! Imports take OCI image layouts and `docker save` archives (plain or gzip'd tar).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What the store knows of one image name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// `sha256:…` of the manifest: the image's ID as `imageID` shows it.
    pub manifest: String,
    /// `sha256:…` of the config blob.
    pub config: String,
    /// `sha256:…` diff ids of the layers, bottom first.
    pub layers: Vec<String>,
    /// Imported images are pinned: image garbage collection leaves them alone.
    #[serde(default)]
    pub pinned: bool,
}

/// The parts of an image's config that a container starts from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {0:?} is not present on this node")]
    NotFound(String),
    #[error("bad image archive: {0}")]
    BadArchive(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn bad(message: impl Into<String>) -> ImageError {
    ImageError::BadArchive(message.into())
}

/// A reference as pods name it, completed as the registry would: no tag and no digest means
/// `:latest`.
pub fn normalize(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if reference.contains('@') || last.contains(':') { reference.to_string() } else { format!("{reference}:latest") }
}

/// The short name a fully qualified reference is also known by: `host/library/x:t` → `x:t`,
/// `host/org/x:t` → `org/x:t`. A first component with a dot, a colon or `localhost` is a host.
fn familiar(reference: &str) -> Option<String> {
    let (first, rest) = reference.split_once('/')?;
    if !(first.contains('.') || first.contains(':') || first == "localhost") {
        return None;
    }
    Some(rest.strip_prefix("library/").unwrap_or(rest).to_string())
}

#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    /// The names, and the modification time of `images.json` they were read at: another
    /// process (`tugboat images import`) may add images while a kubelet runs.
    names: Mutex<(BTreeMap<String, Image>, Option<std::time::SystemTime>)>,
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ImageStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore, ImageError> {
        let root = root.into();
        std::fs::create_dir_all(root.join("blobs/sha256"))?;
        std::fs::create_dir_all(root.join("layers"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        let names = read_names(&root)?;
        let stamp = modified(&root.join("images.json"));
        Ok(ImageStore { root, names: Mutex::new((names, stamp)) })
    }

    /// The names, read again if `images.json` changed since.
    fn names(&self) -> std::sync::MutexGuard<'_, (BTreeMap<String, Image>, Option<std::time::SystemTime>)> {
        let mut names = self.names.lock().unwrap();
        let stamp = modified(&self.root.join("images.json"));
        if stamp != names.1
            && let Ok(fresh) = read_names(&self.root)
        {
            *names = (fresh, stamp);
        }
        names
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image a pod's `image:` names, if present.
    pub fn get(&self, reference: &str) -> Option<(String, Image)> {
        let wanted = normalize(reference);
        let guard = self.names();
        let names = &guard.0;
        if let Some(image) = names.get(&wanted) {
            return Some((wanted, image.clone()));
        }
        names
            .iter()
            .find(|(name, _)| familiar(name).as_deref() == Some(wanted.as_str()))
            .map(|(n, i)| (n.clone(), i.clone()))
    }

    pub fn list(&self) -> BTreeMap<String, Image> {
        self.names().0.clone()
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
    }

    /// The unpacked directories of an image's layers, bottom first.
    pub fn layer_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image.layers.iter().map(|d| self.root.join("layers").join(d.trim_start_matches("sha256:"))).collect()
    }

    pub fn config(&self, image: &Image) -> Result<ImageConfig, ImageError> {
        let config: Value = serde_json::from_slice(&std::fs::read(self.blob_path(&image.config))?)
            .map_err(|e| bad(format!("image config: {e}")))?;
        let c = &config["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
        };
        Ok(ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
            user: c["User"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// Imports an OCI image layout or a `docker save` archive; returns the names it held.
    pub fn import(&self, archive: &Path) -> Result<Vec<String>, ImageError> {
        let scratch = tempfile_dir(&self.root.join("tmp"))?;
        let result = self.import_in(archive, &scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    fn import_in(&self, archive: &Path, scratch: &Path) -> Result<Vec<String>, ImageError> {
        let mut tar = tar::Archive::new(open_tar(archive)?);
        for entry in tar.entries().map_err(|e| bad(e.to_string()))? {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let kind = entry.header().entry_type();
            if kind.is_dir() || kind.is_pax_global_extensions() {
                continue;
            }
            if !(kind.is_file() || kind.is_symlink() || kind.is_hard_link()) {
                continue;
            }
            entry.unpack_in(scratch).map_err(|e| bad(e.to_string()))?;
        }
        if scratch.join("index.json").exists() {
            self.import_oci(scratch)
        } else if scratch.join("manifest.json").exists() {
            self.import_docker(scratch)
        } else {
            Err(bad("neither an OCI layout (index.json) nor a docker archive (manifest.json)"))
        }
    }

    fn import_oci(&self, dir: &Path) -> Result<Vec<String>, ImageError> {
        let index = read_json(&dir.join("index.json"))?;
        let mut names = Vec::new();
        for descriptor in index["manifests"].as_array().ok_or_else(|| bad("index.json has no manifests"))? {
            let annotations = &descriptor["annotations"];
            let name = annotations["io.containerd.image.name"]
                .as_str()
                .or_else(|| annotations["org.opencontainers.image.ref.name"].as_str())
                .ok_or_else(|| bad("a manifest in index.json has no image name annotation"))?;
            let name = normalize(name);
            let mut digest = str_field(descriptor, "digest")?.to_string();
            let mut manifest = read_json(&blob_in(dir, &digest)?)?;
            // An index (several platforms): take this machine's.
            if manifest["manifests"].is_array() {
                let arch = crate::goarch();
                let chosen = manifest["manifests"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["platform"]["architecture"] == arch && m["platform"]["os"] == "linux")
                    .ok_or_else(|| bad(format!("{name}: no manifest for linux/{arch}")))?;
                digest = str_field(chosen, "digest")?.to_string();
                manifest = read_json(&blob_in(dir, &digest)?)?;
            }
            let config = str_field(&manifest["config"], "digest")?.to_string();
            let layers: Vec<PathBuf> = manifest["layers"]
                .as_array()
                .ok_or_else(|| bad(format!("{name}: manifest has no layers")))?
                .iter()
                .map(|l| blob_in(dir, str_field(l, "digest")?))
                .collect::<Result<_, _>>()?;
            self.add(&name, dir, &digest, &config, &layers, true)?;
            names.push(name);
        }
        Ok(names)
    }

    fn import_docker(&self, dir: &Path) -> Result<Vec<String>, ImageError> {
        let manifest = read_json(&dir.join("manifest.json"))?;
        let mut names = Vec::new();
        for image in manifest.as_array().ok_or_else(|| bad("manifest.json is not a list"))? {
            let config_path = dir.join(safe_rel(str_field(image, "Config")?)?);
            let config = format!("sha256:{}", sha256_file(&config_path)?);
            copy_blob(&config_path, &self.blob_path(&config))?;
            let layers: Vec<PathBuf> = image["Layers"]
                .as_array()
                .ok_or_else(|| bad("manifest.json: no Layers"))?
                .iter()
                .map(
                    |l| Ok(dir.join(safe_rel(l.as_str().ok_or_else(|| bad("manifest.json: a layer is not a path"))?)?)),
                )
                .collect::<Result<_, ImageError>>()?;
            // docker archives carry no registry manifest: make one, so the image has an ID.
            let mut layer_descriptors = Vec::new();
            for layer in &layers {
                let digest = format!("sha256:{}", sha256_file(layer)?);
                layer_descriptors.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest,
                    "size": std::fs::metadata(layer)?.len(),
                }));
            }
            let made = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                           "size": std::fs::metadata(&config_path)?.len()},
                "layers": layer_descriptors,
            }))
            .unwrap();
            let digest = format!("sha256:{}", hex(&Sha256::digest(&made)));
            let manifest_path = dir.join("tugboat-manifest.json");
            std::fs::write(&manifest_path, &made)?;
            copy_blob(&manifest_path, &self.blob_path(&digest))?;
            let tags: Vec<String> = image["RepoTags"]
                .as_array()
                .map(|t| t.iter().filter_map(|s| s.as_str().map(normalize)).collect())
                .unwrap_or_default();
            if tags.is_empty() {
                return Err(bad("manifest.json: an image without RepoTags cannot be named by a pod"));
            }
            for tag in tags {
                self.add(&tag, dir, &digest, &config, &layers, true)?;
                names.push(tag);
            }
        }
        Ok(names)
    }

    /// Stores the blobs, unpacks the layers not unpacked yet and records the name.
    pub(crate) fn add(
        &self,
        name: &str,
        dir: &Path,
        manifest: &str,
        config: &str,
        layers: &[PathBuf],
        pinned: bool,
    ) -> Result<Image, ImageError> {
        for digest in [manifest, config] {
            let target = self.blob_path(digest);
            if !target.exists() {
                let source = blob_in(dir, digest).or_else(|_| Ok::<_, ImageError>(target.clone()))?;
                if source != target {
                    copy_blob(&source, &target)?;
                }
            }
        }
        let config_json = read_json(&self.blob_path(config))?;
        let diff_ids: Vec<String> = config_json["rootfs"]["diff_ids"]
            .as_array()
            .ok_or_else(|| bad(format!("{name}: config has no rootfs.diff_ids")))?
            .iter()
            .filter_map(|d| d.as_str().map(str::to_string))
            .collect();
        if diff_ids.len() != layers.len() {
            return Err(bad(format!("{name}: {} layers but {} diff ids", layers.len(), diff_ids.len())));
        }
        for (layer, diff_id) in layers.iter().zip(&diff_ids) {
            let target = self.root.join("layers").join(diff_id.trim_start_matches("sha256:"));
            if target.exists() {
                continue;
            }
            let partial = target.with_extension("partial");
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(&partial)?;
            let unpacked_digest = unpack_layer(layer, &partial)?;
            if format!("sha256:{unpacked_digest}") != *diff_id {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(bad(format!("{name}: layer {} does not match its diff id {diff_id}", layer.display())));
            }
            std::fs::rename(&partial, &target)?;
        }
        let image = Image { manifest: manifest.to_string(), config: config.to_string(), layers: diff_ids, pinned };
        let mut names = self.names();
        names.0.insert(name.to_string(), image.clone());
        let bytes = serde_json::to_vec_pretty(&names.0).unwrap();
        write_durably(&self.root.join("images.json"), &bytes)?;
        names.1 = modified(&self.root.join("images.json"));
        Ok(image)
    }
}

impl ImageStore {
    /// Forgets the image `name` and removes every blob and unpacked layer no other image uses
    /// (image garbage collection: the caller knows no container uses it).
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let mut names = self.names();
        let Some(removed) = names.0.remove(name) else {
            return Err(ImageError::NotFound(name.to_string()));
        };
        let bytes = serde_json::to_vec_pretty(&names.0).unwrap();
        write_durably(&self.root.join("images.json"), &bytes)?;
        names.1 = modified(&self.root.join("images.json"));
        // What an image holds: its manifest, config and layer blobs, and its unpacked layers.
        let held = |image: &Image| -> (Vec<String>, Vec<String>) {
            let mut blobs = vec![image.manifest.clone(), image.config.clone()];
            if let Ok(manifest) = read_json(&self.blob_path(&image.manifest)) {
                for layer in manifest["layers"].as_array().into_iter().flatten() {
                    if let Some(digest) = layer["digest"].as_str() {
                        blobs.push(digest.to_string());
                    }
                }
            }
            (blobs, image.layers.clone())
        };
        let (mut kept_blobs, mut kept_layers) = (std::collections::HashSet::new(), std::collections::HashSet::new());
        for image in names.0.values() {
            let (blobs, layers) = held(image);
            kept_blobs.extend(blobs);
            kept_layers.extend(layers);
        }
        let (blobs, layers) = held(&removed);
        for blob in blobs.iter().filter(|b| !kept_blobs.contains(*b)) {
            let _ = std::fs::remove_file(self.blob_path(blob));
        }
        for layer in layers.iter().filter(|l| !kept_layers.contains(*l)) {
            let dir = self.root.join("layers").join(layer.trim_start_matches("sha256:"));
            // Renamed first: a half-removed layer is never mistaken for an unpacked one.
            let doomed = dir.with_extension("removing");
            if std::fs::rename(&dir, &doomed).is_ok() {
                std::fs::remove_dir_all(&doomed)?;
            }
        }
        Ok(())
    }
}

fn read_names(root: &Path) -> Result<BTreeMap<String, Image>, ImageError> {
    match std::fs::read(root.join("images.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| bad(format!("images.json: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e.into()),
    }
}

/// Writes a file whole (temporary file, fsync, rename).
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn tempfile_dir(parent: &Path) -> std::io::Result<PathBuf> {
    for attempt in 0..100u32 {
        let dir = parent.join(format!("import-{}-{attempt}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free scratch directory"))
}

fn read_json(path: &Path) -> Result<Value, ImageError> {
    let bytes = std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("{}: {e}", path.display())))
}

fn str_field<'a>(v: &'a Value, field: &str) -> Result<&'a str, ImageError> {
    v[field].as_str().ok_or_else(|| bad(format!("missing {field:?}")))
}

fn safe_rel(path: &str) -> Result<&str, ImageError> {
    if path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(bad(format!("path {path:?} leaves the archive")));
    }
    Ok(path)
}

fn blob_in(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let (algorithm, hex) = digest.split_once(':').ok_or_else(|| bad(format!("bad digest {digest:?}")))?;
    if algorithm != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("unsupported digest {digest:?}")));
    }
    let path = dir.join("blobs").join(algorithm).join(hex);
    if !path.exists() {
        return Err(bad(format!("blob {digest} is missing from the archive")));
    }
    Ok(path)
}

fn copy_blob(from: &Path, to: &Path) -> std::io::Result<()> {
    let tmp = to.with_extension("partial");
    std::fs::copy(from, &tmp)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut File::open(path)?, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A tar stream from a file that holds one, gzip'd or not.
fn open_tar(path: &Path) -> std::io::Result<Box<dyn Read>> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 2];
    let gzip = file.read(&mut magic)? == 2 && magic == [0x1f, 0x8b];
    file.seek(SeekFrom::Start(0))?;
    Ok(if gzip { Box::new(flate2::read::GzDecoder::new(BufReader::new(file))) } else { Box::new(BufReader::new(file)) })
}

/// Unpacks one layer (tar, maybe gzip'd) into `dir`, turning OCI whiteouts into overlayfs ones;
/// returns the sha256 of the uncompressed tar (its diff id).
fn unpack_layer(layer: &Path, dir: &Path) -> Result<String, ImageError> {
    let mut hashing = Hashing { inner: open_tar(layer)?, hasher: Sha256::new() };
    {
        let mut tar = tar::Archive::new(&mut hashing);
        tar.set_preserve_permissions(true);
        tar.set_preserve_ownerships(true);
        tar.set_unpack_xattrs(true);
        tar.set_overwrite(true);
        for entry in tar.entries().map_err(|e| bad(e.to_string()))? {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let path = entry.path().map_err(|e| bad(e.to_string()))?.into_owned();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            if name == ".wh..wh..opq" {
                let target = dir.join(&parent);
                std::fs::create_dir_all(&target)?;
                xattr::set(&target, "trusted.overlay.opaque", b"y")?;
            } else if let Some(hidden) = name.strip_prefix(".wh.") {
                if safe_rel(&parent.to_string_lossy()).is_err() || hidden.contains('/') {
                    return Err(bad(format!("whiteout {path:?} leaves the layer")));
                }
                let target = dir.join(&parent);
                std::fs::create_dir_all(&target)?;
                nix::sys::stat::mknod(
                    &target.join(hidden),
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    nix::sys::stat::makedev(0, 0),
                )
                .map_err(std::io::Error::from)?;
            } else {
                entry
                    .unpack_in(dir)
                    .map_err(|e| bad(format!("{}: {e} ({:?})", path.display(), std::error::Error::source(&e))))?;
            }
        }
    }
    // The tar reader stops at the end-of-archive blocks; the digest covers the padding too.
    std::io::copy(&mut hashing, &mut std::io::sink())?;
    Ok(hex(&hashing.hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_completed_and_known_by_their_short_names() {
        assert_eq!(normalize("busybox"), "busybox:latest");
        assert_eq!(normalize("127.0.0.1:5000/busybox"), "127.0.0.1:5000/busybox:latest");
        assert_eq!(normalize("x/busybox:1.36"), "x/busybox:1.36");
        assert_eq!(normalize("busybox@sha256:abc"), "busybox@sha256:abc");
        assert_eq!(familiar("registry.example:5000/library/busybox:latest").as_deref(), Some("busybox:latest"));
        assert_eq!(familiar("localhost/org/app:1").as_deref(), Some("org/app:1"));
        assert_eq!(familiar("org/app:1"), None);
    }
}
