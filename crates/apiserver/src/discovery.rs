//! Discovery documents (legacy format): `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`.
//! Clients that ask for aggregated discovery get these too, with `application/json`, and fall
//! back to reading them.

use serde_json::{Value, json};

use crate::registry::Resource;
use crate::resource_metrics;

/// What discovery lists: the built-in resources, then the custom ones served now.
pub type Served<'a> = &'a [&'static Resource];

/// The served groups (other than core) with their versions, preferred first: the stored
/// resources' groups in the order they are registered, `metrics.k8s.io`, then the groups custom
/// resources add.
fn groups(resources: Served) -> Vec<(&'static str, Vec<&'static str>)> {
    let mut groups: Vec<(&'static str, Vec<&'static str>)> = Vec::new();
    let mut metrics_added = false;
    for resource in resources.iter().filter(|r| !r.group.is_empty()) {
        if resource.custom.is_some() && !metrics_added {
            groups.push((resource_metrics::GROUP, vec![resource_metrics::VERSION]));
            metrics_added = true;
        }
        match groups.iter_mut().find(|(g, _)| *g == resource.group) {
            Some((_, versions)) if !versions.contains(&resource.version) => versions.push(resource.version),
            Some(_) => {}
            None => groups.push((resource.group, vec![resource.version])),
        }
    }
    if !metrics_added {
        groups.push((resource_metrics::GROUP, vec![resource_metrics::VERSION]));
    }
    for (_, versions) in &mut groups {
        versions.sort_by(|a, b| crate::custom::version_priority(a, b));
    }
    groups
}

/// The metrics resources, as discovery lists them (read-only, never stored).
fn metrics_resources() -> impl Iterator<Item = (&'static str, &'static str, bool)> {
    resource_metrics::RESOURCES.iter().copied()
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_entry(group: &str, versions: &[&str]) -> Value {
    let entry = |version: &str| json!({"groupVersion": format!("{group}/{version}"), "version": version});
    let all: Vec<Value> = versions.iter().map(|v| entry(v)).collect();
    json!({"name": group, "versions": all, "preferredVersion": entry(versions.first().copied().unwrap_or_default())})
}

pub fn api_group_list(resources: Served) -> Value {
    let groups: Vec<Value> = groups(resources).into_iter().map(|(g, v)| group_entry(g, &v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, if the group is served.
pub fn api_group(resources: Served, group: &str) -> Option<Value> {
    groups(resources).into_iter().find(|(g, _)| *g == group).map(|(g, v)| {
        let mut entry = group_entry(g, &v);
        entry["kind"] = json!("APIGroup");
        entry["apiVersion"] = json!("v1");
        entry
    })
}

/// The resources of one group version, if served.
pub fn api_resource_list(served: Served, group: &str, version: &str) -> Option<Value> {
    let resources: Vec<Value> = served
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(|r| {
            let mut entries = vec![resource_entry(r)];
            for sub in r.subresources() {
                let (group, version, kind) = sub.kind;
                let mut entry = json!({"name": format!("{}/{}", r.plural, sub.name), "singularName": "",
                    "namespaced": r.namespaced, "kind": kind, "verbs": sub.verbs});
                // Only a kind of another group version says which.
                if (group, version) != (r.group, r.version) {
                    entry["group"] = json!(group);
                    entry["version"] = json!(version);
                }
                entries.push(entry);
            }
            entries
        })
        .collect();
    let mut resources = resources;
    if group == resource_metrics::GROUP && version == resource_metrics::VERSION {
        resources.extend(metrics_resources().map(|(plural, kind, namespaced)| {
            json!({"name": plural, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": ["get", "list"]})
        }));
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}))
}

fn resource_entry(r: &Resource) -> Value {
    let mut entry = json!({
        "name": r.plural,
        "singularName": r.singular,
        "namespaced": r.namespaced,
        "kind": r.kind,
        "verbs": r.verbs(),
    });
    add_names(&mut entry, r);
    entry
}

/// Short names and categories, where a resource has them: both discovery formats list them.
fn add_names(entry: &mut Value, r: &Resource) {
    if !r.short_names.is_empty() {
        entry["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        entry["categories"] = json!(r.categories);
    }
}

/// Which aggregated discovery version the client accepts first, if any
/// (`application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList`).
pub fn aggregated_version(accept: &str) -> Option<&'static str> {
    for media in accept.split(',') {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        if params.first() != Some(&"application/json") {
            continue;
        }
        if params.contains(&"g=apidiscovery.k8s.io") && params.contains(&"as=APIGroupDiscoveryList") {
            if params.contains(&"v=v2") {
                return Some("v2");
            }
            if params.contains(&"v=v2beta1") {
                return Some("v2beta1");
            }
        } else if params.len() == 1 {
            // Plain JSON comes first: the client prefers the legacy documents.
            return None;
        }
    }
    None
}

fn response_kind(group: &str, version: &str, kind: &str) -> Value {
    json!({"group": group, "version": version, "kind": kind})
}

/// The aggregated discovery document of `/api` (core) or `/apis` (every other group).
pub fn aggregated(served: Served, core: bool, version: &str) -> Value {
    let groups: Vec<(&str, Vec<&str>)> = if core { vec![("", vec!["v1"])] } else { groups(served) };
    let items: Vec<Value> = groups
        .into_iter()
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .into_iter()
                .map(|group_version| aggregated_version_entry(served, group, group_version))
                .collect();
            json!({"metadata": {"name": group, "creationTimestamp": null}, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}

/// One group version of an aggregated discovery document.
fn aggregated_version_entry(served: Served, group: &str, group_version: &str) -> Value {
    let mut resources: Vec<Value> = served
                .iter()
                .filter(|r| r.group == group && r.version == group_version)
                .map(|r| {
                    let subresources: Vec<Value> = r
                        .subresources()
                        .into_iter()
                        .map(|sub| {
                            let (group, version, kind) = sub.kind;
                            json!({"subresource": sub.name, "responseKind": response_kind(group, version, kind), "verbs": sub.verbs})
                        })
                        .collect();
                    let mut entry = json!({
                        "resource": r.plural,
                        "responseKind": response_kind(r.group, r.version, r.kind),
                        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": r.singular,
                        "verbs": r.verbs(),
                    });
                    add_names(&mut entry, r);
                    if !subresources.is_empty() {
                        entry["subresources"] = Value::Array(subresources);
                    }
                    entry
                })
                .collect();
    if group == resource_metrics::GROUP {
        resources.extend(metrics_resources().map(|(plural, kind, namespaced)| {
            json!({
                "resource": plural,
                "responseKind": response_kind(group, group_version, kind),
                "scope": if namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": "",
                "verbs": ["get", "list"],
            })
        }));
    }
    json!({"version": group_version, "resources": resources, "freshness": "Current"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built_in() -> Vec<&'static Resource> {
        crate::registry::RESOURCES.iter().collect()
    }

    #[test]
    fn the_accept_header_picks_the_aggregated_version() {
        let new = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(new), Some("v2"));
        let old = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json";
        assert_eq!(aggregated_version(old), Some("v2beta1"));
        assert_eq!(aggregated_version("application/json, */*"), None);
        assert_eq!(aggregated_version(""), None);
    }

    #[test]
    fn aggregated_documents_list_resources_with_subresources() {
        let core = aggregated(&built_in(), true, "v2");
        assert_eq!(core["items"][0]["metadata"]["name"], "");
        let pods = core["items"][0]["versions"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == "pods")
            .unwrap();
        assert_eq!(pods["scope"], "Namespaced");
        assert_eq!(pods["subresources"][0]["subresource"], "status");
        let apps = aggregated(&built_in(), false, "v2beta1");
        assert_eq!(apps["apiVersion"], "apidiscovery.k8s.io/v2beta1");
        let deployments =
            apps["items"].as_array().unwrap().iter().find(|g| g["metadata"]["name"] == "apps").unwrap()["versions"][0]
                ["resources"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["resource"] == "deployments")
                .unwrap()
                .clone();
        assert_eq!(deployments["subresources"][1]["responseKind"]["kind"], "Scale");
    }

    #[test]
    fn the_metrics_group_is_discovered_in_both_formats() {
        let groups = api_group_list(&built_in());
        assert!(groups["groups"].as_array().unwrap().iter().any(
            |g| g["name"] == "metrics.k8s.io" && g["preferredVersion"]["groupVersion"] == "metrics.k8s.io/v1beta1"
        ));
        let list = api_resource_list(&built_in(), "metrics.k8s.io", "v1beta1").unwrap();
        let names: Vec<&str> =
            list["resources"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["nodes", "pods"]);
        let aggregated = aggregated(&built_in(), false, "v2");
        let metrics =
            aggregated["items"].as_array().unwrap().iter().find(|g| g["metadata"]["name"] == "metrics.k8s.io").unwrap();
        assert_eq!(metrics["versions"][0]["resources"][1]["responseKind"]["kind"], "PodMetrics");
    }
}
