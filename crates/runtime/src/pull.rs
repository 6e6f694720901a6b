//! Pulling images from registries (`oci-client`): the manifest (the platform's, from an
//! index), the config, and each layer not unpacked yet, streamed to the blob store, checked
//! against its digest, and unpacked once. Registries named with `--insecure-registry` are
//! spoken to over plain HTTP.

use std::path::Path;

use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::images::{Image, ImageStore, hex, write_durably};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("{0}")]
    Registry(String),
    #[error("invalid reference format: {0}")]
    Reference(String),
    #[error(transparent)]
    Store(#[from] crate::images::ImageError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct Puller {
    client: Client,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller").finish_non_exhaustive()
    }
}

/// Credentials for a registry (from an imagePullSecret), or none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Puller {
    /// `insecure`: `host:port` of registries spoken to over plain HTTP.
    pub fn new(insecure: &[String]) -> Puller {
        let config = oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::HttpsExcept(insecure.to_vec()),
            ..Default::default()
        };
        Puller { client: Client::new(config) }
    }

    /// The registry (`host[:port]`) a reference is pulled from.
    pub fn registry_of(reference: &str) -> Result<String, PullError> {
        let parsed: Reference = reference.parse().map_err(|e| PullError::Reference(format!("{reference:?}: {e}")))?;
        Ok(parsed.resolve_registry().to_string())
    }

    /// Pulls `reference` into `store` and names it so; returns the image and its size.
    pub async fn pull(
        &self,
        store: &ImageStore,
        reference: &str,
        credentials: Option<&Credentials>,
    ) -> Result<(Image, u64), PullError> {
        let parsed: Reference = reference.parse().map_err(|e| PullError::Reference(format!("{reference:?}: {e}")))?;
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let registry = |e: oci_client::errors::OciDistributionError| {
            PullError::Registry(format!("failed to pull and unpack image {reference:?}: {e}"))
        };
        let (manifest, digest, config) =
            self.client.pull_manifest_and_config(&parsed, &auth).await.map_err(registry)?;
        let config_digest = manifest.config.digest.clone();
        let config_bytes = config.into_bytes();
        if format!("sha256:{}", hex(&Sha256::digest(&config_bytes))) != config_digest {
            return Err(PullError::Registry(format!(
                "{reference}: the config does not match its digest {config_digest}"
            )));
        }
        write_durably(&store.blob_path(&config_digest), &config_bytes)?;
        let mut size = config_bytes.len() as u64;
        let mut layer_blobs = Vec::new();
        for layer in &manifest.layers {
            let path = store.blob_path(&layer.digest);
            size += layer.size.max(0) as u64;
            if !path.exists() {
                let partial = path.with_extension("download");
                let mut file = tokio::fs::File::create(&partial).await?;
                self.client.pull_blob(&parsed, layer, &mut file).await.map_err(registry)?;
                file.flush().await?;
                file.sync_all().await?;
                drop(file);
                let got = sha256_file(&partial).await?;
                if format!("sha256:{got}") != layer.digest {
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(PullError::Registry(format!(
                        "{reference}: layer {} does not match its digest",
                        layer.digest
                    )));
                }
                tokio::fs::rename(&partial, &path).await?;
            }
            layer_blobs.push(path);
        }
        let name = crate::images::normalize(reference);
        let store_dir = store.root().to_path_buf();
        let (store_name, digest_clone) = (name.clone(), digest.clone());
        // Unpacking is blocking work.
        let image = tokio::task::block_in_place(|| {
            store.add(&store_name, &store_dir, &digest_clone, &config_digest, &layer_blobs, false)
        })?;
        Ok((image, size))
    }
}

async fn sha256_file(path: &Path) -> std::io::Result<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&path)?, &mut hasher)?;
        Ok(hex(&hasher.finalize()))
    })
    .await
    .map_err(std::io::Error::other)?
}
