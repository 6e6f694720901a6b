//! Image garbage collection, as upstream's kubelet does it: when the filesystem holding the
//! images is fuller than `--image-gc-high-threshold` percent, images no container uses (running
//! or exited and kept) are removed, least recently used first, until it is down to
//! `--image-gc-low-threshold`. Pinned images (imported from archives) and images first seen or
//! used less than `--image-minimum-gc-age` ago are left alone.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pods::Shared;

/// How often the disk is looked at (a statvfs; removals happen only above the threshold).
const PERIOD: Duration = Duration::from_secs(10);

/// The thresholds (percent of the image filesystem in use) and the minimum age.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// 100 turns image garbage collection off.
    pub high: u8,
    pub low: u8,
    pub min_age: Duration,
}

impl Default for Policy {
    /// Upstream's defaults.
    fn default() -> Self {
        Policy { high: 85, low: 80, min_age: Duration::from_secs(120) }
    }
}

#[derive(Debug, Default)]
pub struct ImageGc {
    pub policy: Policy,
    /// When each image (by name) was last used by a container, or first seen.
    last_used: Mutex<HashMap<String, Instant>>,
}

impl ImageGc {
    pub fn new(policy: Policy) -> ImageGc {
        ImageGc { policy, last_used: Mutex::default() }
    }

    /// Records that a container is about to start from `name`.
    pub fn touch(&self, name: &str) {
        self.last_used.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), Instant::now());
    }

    /// The removable images, least recently used first: not pinned, not `in_use` (by name or
    /// image ID), not younger than the minimum age.
    pub fn candidates(
        &self,
        images: &std::collections::BTreeMap<String, tugboat_runtime::images::Image>,
        in_use: &HashSet<String>,
        now: Instant,
    ) -> Vec<String> {
        let mut last_used = self.last_used.lock().unwrap_or_else(|e| e.into_inner());
        last_used.retain(|name, _| images.contains_key(name));
        let mut candidates: Vec<(Instant, String)> = images
            .iter()
            .filter(|(name, image)| !image.pinned && !in_use.contains(*name) && !in_use.contains(&image.manifest))
            .map(|(name, _)| (*last_used.entry(name.clone()).or_insert(now), name.clone()))
            .filter(|(used, _)| now.duration_since(*used) >= self.policy.min_age)
            .collect();
        candidates.sort();
        candidates.into_iter().map(|(_, name)| name).collect()
    }
}

/// Percent of the filesystem holding `path` in use.
fn usage(path: &std::path::Path) -> Option<u64> {
    let fs = crate::host::filesystem(path).ok()?;
    (fs.capacity > 0).then(|| (fs.capacity - fs.available.min(fs.capacity)) * 100 / fs.capacity)
}

/// One pass: removes images while the disk is fuller than the policy allows; returns their names.
pub async fn collect(node: &Shared) -> anyhow::Result<Vec<String>> {
    let policy = node.image_gc.policy;
    let root = node.images.root().to_path_buf();
    if policy.high >= 100 || usage(&root).is_none_or(|used| used < u64::from(policy.high)) {
        return Ok(Vec::new());
    }
    let mut in_use = HashSet::new();
    for container in node.runtime.list().await? {
        in_use.insert(container.config.image.clone());
        in_use.insert(container.config.image_id.clone());
    }
    let mut removed = Vec::new();
    for name in node.image_gc.candidates(&node.images.list(), &in_use, Instant::now()) {
        if usage(&root).is_some_and(|used| used <= u64::from(policy.low)) {
            break;
        }
        let images = node.images.clone();
        let gone = name.clone();
        tokio::task::spawn_blocking(move || images.remove(&gone)).await??;
        tracing::info!(image = %name, "image garbage collection removed an image");
        removed.push(name);
    }
    Ok(removed)
}

/// Collects every [`PERIOD`] for as long as the kubelet runs.
pub async fn run(node: Shared) {
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        if let Err(error) = collect(&node).await {
            tracing::warn!(error = format!("{error:#}"), "image garbage collection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tugboat_runtime::images::Image;

    fn image(manifest: &str, pinned: bool) -> Image {
        Image { manifest: manifest.into(), config: String::new(), layers: vec![], pinned }
    }

    #[test]
    fn unused_unpinned_old_enough_images_go_least_recently_used_first() {
        let gc = ImageGc::new(Policy { high: 85, low: 80, min_age: Duration::from_secs(60) });
        let images: std::collections::BTreeMap<String, Image> = [
            ("a:1".to_string(), image("sha256:a", false)),
            ("b:1".to_string(), image("sha256:b", false)),
            ("pinned:1".to_string(), image("sha256:p", true)),
            ("running:1".to_string(), image("sha256:r", false)),
            ("by-id:1".to_string(), image("sha256:i", false)),
        ]
        .into();
        let in_use: HashSet<String> = ["running:1".to_string(), "sha256:i".to_string()].into();
        let t0 = Instant::now();
        // First seen now: too young.
        assert!(gc.candidates(&images, &in_use, t0).is_empty());
        std::thread::sleep(Duration::from_millis(2));
        gc.touch("a:1");
        let later = Instant::now() + Duration::from_secs(120);
        // b was first seen at t0, a touched after: b goes first.
        assert_eq!(gc.candidates(&images, &in_use, later), ["b:1", "a:1"]);
    }
}
