//! Test images made from the host's static busybox (Debian `busybox-static`): one layer with
//! `/bin/busybox`, a link per applet, `/etc/passwd`, `/etc/group`, `/tmp`; packed as an OCI
//! image layout archive (what `tugboat images import` and a registry push take).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use sha2::{Digest, Sha256};

pub const BUSYBOX: &str = "/bin/busybox";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// The host's static busybox: `/bin/busybox` from Debian's busybox-static (the dynamic
/// `busybox` package conflicts with it and would not run in an image without its libraries).
pub fn busybox_binary() -> anyhow::Result<PathBuf> {
    let path = Path::new(BUSYBOX);
    anyhow::ensure!(path.exists(), "no {BUSYBOX}: install Debian's busybox-static");
    Ok(path.to_path_buf())
}

/// The image's layer (an uncompressed tar) with the given extra files (path, bytes, mode); a
/// mode of `0o120777` makes a symbolic link to the path the bytes name. An extra file at
/// `bin/<applet>` takes the place of that applet's link.
pub fn busybox_layer(extra: &[(&str, &[u8], u32)]) -> anyhow::Result<Vec<u8>> {
    busybox_layer_of(&busybox_binary()?, extra)
}

/// [`busybox_layer`] with another (static) busybox binary than the host's.
pub fn busybox_layer_of(busybox: &Path, extra: &[(&str, &[u8], u32)]) -> anyhow::Result<Vec<u8>> {
    let list = std::process::Command::new(busybox).arg("--list").output().context("busybox --list")?;
    let applets: Vec<String> = String::from_utf8_lossy(&list.stdout).lines().map(str::to_string).collect();
    let mut tar = tar::Builder::new(Vec::new());
    let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(mode);
        header.set_size(0);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, path, std::io::empty())?;
        Ok(())
    };
    let file = |tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, path, data)?;
        Ok(())
    };
    let link = |tar: &mut tar::Builder<Vec<u8>>, path: &str, target: &str| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_link(&mut header, path, target)?;
        Ok(())
    };
    for (path, mode) in
        [("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("root", 0o700), ("var", 0o755), ("home", 0o755)]
    {
        dir(&mut tar, path, mode)?;
    }
    file(&mut tar, "bin/busybox", &std::fs::read(busybox)?, 0o755)?;
    for applet in &applets {
        // An extra file at an applet's path replaces the applet (a real `sh` or `nc`).
        if applet == "busybox" || extra.iter().any(|(path, _, _)| *path == format!("bin/{applet}")) {
            continue;
        }
        link(&mut tar, &format!("bin/{applet}"), "busybox")?;
    }
    file(
        &mut tar,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
        0o644,
    )?;
    file(&mut tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    // Files in directories get their directories first (`usr/share/nginx/html/index.html`).
    let mut made: Vec<String> = Vec::new();
    for (path, data, mode) in extra {
        let parts: Vec<&str> = path.split('/').collect();
        for depth in 1..parts.len() {
            let parent = parts[..depth].join("/");
            if !made.contains(&parent) && !["bin", "etc", "tmp", "root", "var", "home"].contains(&parent.as_str()) {
                dir(&mut tar, &parent, 0o755)?;
                made.push(parent);
            }
        }
        if mode & 0o170000 == 0o120000 {
            link(&mut tar, path, std::str::from_utf8(data)?)?;
        } else {
            file(&mut tar, path, data, *mode)?;
        }
    }
    Ok(tar.into_inner()?)
}

/// The config and manifest of a one-layer image.
pub fn image_blobs(layer: &[u8], cmd: &[&str]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    image_blobs_with(layer, &[], cmd)
}

/// [`image_blobs`] with an entrypoint too (none when empty).
pub fn image_blobs_with(layer: &[u8], entrypoint: &[&str], cmd: &[&str]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let layer_digest = sha256(layer);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": (!entrypoint.is_empty()).then_some(entrypoint),
            "Cmd": cmd,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))?;
    Ok((config, manifest))
}

/// Writes an OCI image layout archive holding one image `name` (e.g. `busybox:1.35`) made of
/// `layer`, with `cmd` as its default command.
pub fn oci_archive(path: &Path, name: &str, layer: &[u8], cmd: &[&str]) -> anyhow::Result<()> {
    oci_archive_with(path, &[name], layer, &[], cmd)
}

/// [`oci_archive`] with an entrypoint too (none when empty), and the image under every name of
/// `names` (one set of blobs).
pub fn oci_archive_with(
    path: &Path,
    names: &[&str],
    layer: &[u8],
    entrypoint: &[&str],
    cmd: &[&str],
) -> anyhow::Result<()> {
    let (config, manifest) = image_blobs_with(layer, entrypoint, cmd)?;
    let (layer_digest, config_digest, manifest_digest) = (sha256(layer), sha256(&config), sha256(&manifest));
    let manifests: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
            })
        })
        .collect();
    let index = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))?;
    let mut tar = tar::Builder::new(std::fs::File::create(path)?);
    let mut add = |name: String, data: &[u8]| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, name, data)?;
        Ok(())
    };
    add("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json".into(), &index)?;
    for (digest, data) in [(&layer_digest, layer), (&config_digest, &config[..]), (&manifest_digest, &manifest[..])] {
        add(format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")), data)?;
    }
    tar.into_inner()?.sync_all()?;
    Ok(())
}

/// Debian's `docker-registry` on a free loopback port, with a config of its own (Debian's
/// default listens on every address with auth), storage in a temp dir; killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub address: String,
}

impl Registry {
    pub fn start() -> anyhow::Result<Registry> {
        let dir = tempfile::Builder::new().prefix("tugboat-registry-").tempdir()?;
        let port = crate::free_port();
        let address = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp:\n  addr: {address}\n",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config)?;
        let child = std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log"))?)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let registry = Registry { child, _dir: dir, address };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while curl(&["-sf", &format!("http://{}/v2/", registry.address)]).is_err() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the registry never answered");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(registry)
    }

    /// Pushes a one-layer image as `repository:tag` (the registry's v2 API, through curl).
    pub fn push(&self, repository: &str, tag: &str, layer: &[u8], cmd: &[&str]) -> anyhow::Result<()> {
        let (config, manifest) = image_blobs(layer, cmd)?;
        let scratch = tempfile::tempdir()?;
        for (digest, data) in [(sha256(layer), layer), (sha256(&config), &config[..])] {
            let file = scratch.path().join(digest.trim_start_matches("sha256:"));
            std::fs::write(&file, data)?;
            let headers = curl(&[
                "-sf",
                "-X",
                "POST",
                "-D",
                "-",
                "-o",
                "/dev/null",
                &format!("http://{}/v2/{repository}/blobs/uploads/", self.address),
            ])?;
            let location = headers
                .lines()
                .find_map(|l| l.strip_prefix("Location: ").or_else(|| l.strip_prefix("location: ")))
                .context("no upload location")?
                .trim()
                .to_string();
            let location =
                if location.starts_with('/') { format!("http://{}{location}", self.address) } else { location };
            let separator = if location.contains('?') { '&' } else { '?' };
            curl(&[
                "-sf",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &format!("@{}", file.display()),
                &format!("{location}{separator}digest={digest}"),
            ])?;
        }
        let file = scratch.path().join("manifest.json");
        std::fs::write(&file, &manifest)?;
        curl(&[
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
            "--data-binary",
            &format!("@{}", file.display()),
            &format!("http://{}/v2/{repository}/manifests/{tag}", self.address),
        ])?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("curl").args(args).output().context("running curl")?;
    anyhow::ensure!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The name test images go by: a tag, not `latest`, so upstream's default pull policy is
/// IfNotPresent and an imported image is used as it is.
pub const BUSYBOX_IMAGE: &str = "busybox:1.35";

/// [`BUSYBOX_IMAGE`] as an OCI archive at `path`, its default command `sh`.
pub fn busybox_archive(path: &Path) -> anyhow::Result<()> {
    oci_archive(path, BUSYBOX_IMAGE, &busybox_layer(&[])?, &["sh"])
}

/// Imports [`BUSYBOX_IMAGE`] into the node whose data dir is `data_dir`, with
/// `tugboat images import` (the `tugboat` binary given).
pub fn import_busybox(tugboat: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("busybox.tar");
    busybox_archive(&archive)?;
    let out = std::process::Command::new(tugboat)
        .args(["images", "import"])
        .arg(&archive)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .context("running tugboat images import")?;
    anyhow::ensure!(out.status.success(), "tugboat images import: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}
