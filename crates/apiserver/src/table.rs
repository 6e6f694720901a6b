//! `meta.k8s.io/v1 Table` responses: what `kubectl get` prints. Columns follow upstream's
//! printers for the resources that have them; others get Name and Age.

use serde_json::{Value, json};

use crate::registry::Resource;

/// Whether the client asked for a Table (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`).
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| {
        let params: Vec<&str> = first.split(';').map(str::trim).collect();
        params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io")
    })
}

/// A column: name, type, format, priority (1 = only with `-o wide`).
type Column = (&'static str, &'static str, &'static str, u8);

fn columns(resource: &Resource) -> Vec<Column> {
    let name: Column = ("Name", "string", "name", 0);
    let age: Column = ("Age", "string", "", 0);
    match resource.plural {
        "namespaces" => vec![name, ("Status", "string", "", 0), age],
        "configmaps" => vec![name, ("Data", "integer", "", 0), age],
        "secrets" => vec![
            name,
            ("Type", "string", "", 0),
            ("Data", "integer", "", 0),
            age,
        ],
        "pods" => vec![
            name,
            ("Ready", "string", "", 0),
            ("Status", "string", "", 0),
            ("Restarts", "string", "", 0),
            age,
            ("IP", "string", "", 1),
            ("Node", "string", "", 1),
            ("Nominated Node", "string", "", 1),
            ("Readiness Gates", "string", "", 1),
        ],
        "services" => vec![
            name,
            ("Type", "string", "", 0),
            ("Cluster-IP", "string", "", 0),
            ("External-IP", "string", "", 0),
            ("Port(s)", "string", "", 0),
            age,
            ("Selector", "string", "", 1),
        ],
        "deployments" => vec![
            name,
            ("Ready", "string", "", 0),
            ("Up-to-date", "string", "", 0),
            ("Available", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        _ => vec![name, age],
    }
}

/// Upstream's `HumanDuration` for ages: `45s`, `5m`, `3h`, `2d`, `1y`.
pub fn human_age(seconds: i64) -> String {
    let seconds = seconds.max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60).replace("m0s", "m"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60).replace("h0m", "h"),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600).replace("d0h", "d"),
        s if s < 2 * 365 * 86400 => format!("{}d", s / 86400),
        s => format!("{}y", s / (365 * 86400)),
    }
}

fn age(object: &Value) -> String {
    let Some(created) = object["metadata"]["creationTimestamp"].as_str() else {
        return "<unknown>".into();
    };
    match time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339) {
        Ok(created) => human_age((time::OffsetDateTime::now_utc() - created).whole_seconds()),
        Err(_) => "<unknown>".into(),
    }
}

fn count(value: &Value) -> i64 {
    value.as_object().map(|m| m.len() as i64).unwrap_or(0)
}

fn cells(resource: &Resource, object: &Value) -> Vec<Value> {
    let name = json!(object["metadata"]["name"]);
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let none_if_empty = |v: String| {
        if v.is_empty() {
            "<none>".to_string()
        } else {
            v
        }
    };
    match resource.plural {
        "namespaces" => vec![
            name,
            json!(s(&object["status"]["phase"])),
            json!(age(object)),
        ],
        "configmaps" => {
            let data = count(&object["data"]) + count(&object["binaryData"]);
            vec![name, json!(data), json!(age(object))]
        }
        "secrets" => vec![
            name,
            json!(s(&object["type"])),
            json!(count(&object["data"])),
            json!(age(object)),
        ],
        "pods" => {
            let statuses = object["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let total = object["spec"]["containers"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0);
            let ready = statuses
                .iter()
                .filter(|c| c["ready"] == json!(true))
                .count();
            let restarts: i64 = statuses
                .iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            let phase = object["status"]["phase"].as_str().unwrap_or("Pending");
            let status = if object["metadata"]["deletionTimestamp"].is_string() {
                "Terminating"
            } else {
                phase
            };
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(status),
                json!(restarts.to_string()),
                json!(age(object)),
                json!(none_if_empty(s(&object["status"]["podIP"]))),
                json!(none_if_empty(s(&object["spec"]["nodeName"]))),
                json!("<none>"),
                json!("<none>"),
            ]
        }
        "services" => {
            let ports: Vec<String> = object["spec"]["ports"]
                .as_array()
                .map(|ports| {
                    ports
                        .iter()
                        .map(|p| {
                            let protocol = p["protocol"].as_str().unwrap_or("TCP");
                            match p["nodePort"].as_i64() {
                                Some(node) => format!("{}:{node}/{protocol}", p["port"]),
                                None => format!("{}/{protocol}", p["port"]),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let selector: Vec<String> = object["spec"]["selector"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default();
            let external: Vec<String> = object["spec"]["externalIPs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(object["spec"]["type"].as_str().unwrap_or("ClusterIP")),
                json!(none_if_empty(s(&object["spec"]["clusterIP"]))),
                json!(none_if_empty(external.join(","))),
                json!(none_if_empty(ports.join(","))),
                json!(age(object)),
                json!(none_if_empty(selector.join(","))),
            ]
        }
        "deployments" => {
            let n = |v: &Value| v.as_i64().unwrap_or(0);
            let containers = object["spec"]["template"]["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let names: Vec<String> = containers.iter().map(|c| s(&c["name"])).collect();
            let images: Vec<String> = containers.iter().map(|c| s(&c["image"])).collect();
            let selector: Vec<String> = object["spec"]["selector"]["matchLabels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default();
            let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
            vec![
                name,
                json!(format!(
                    "{}/{replicas}",
                    n(&object["status"]["readyReplicas"])
                )),
                json!(n(&object["status"]["updatedReplicas"])),
                json!(n(&object["status"]["availableReplicas"])),
                json!(age(object)),
                json!(names.join(",")),
                json!(images.join(",")),
                json!(none_if_empty(selector.join(","))),
            ]
        }
        _ => vec![name, json!(age(object))],
    }
}

fn row(resource: &Resource, object: &Value, include_object: &str) -> Value {
    let embedded = match include_object {
        "None" => Value::Null,
        "Object" => object.clone(),
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object["metadata"],
        }),
    };
    json!({"cells": cells(resource, object), "object": embedded})
}

/// A Table of `objects`; `with_columns` false for watch events after the first.
pub fn table(
    resource: &Resource,
    objects: &[Value],
    resource_version: &str,
    continue_token: Option<&str>,
    include_object: &str,
    with_columns: bool,
) -> Value {
    let definitions: Vec<Value> = if with_columns {
        columns(resource)
            .into_iter()
            .map(|(name, kind, format, priority)| {
                json!({"name": name, "type": kind, "format": format, "description": "", "priority": priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": definitions,
        "rows": objects.iter().map(|o| row(resource, o, include_object)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::find;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_age(5), "5s");
        assert_eq!(human_age(119), "119s");
        assert_eq!(human_age(125), "2m5s");
        assert_eq!(human_age(600), "10m");
        assert_eq!(human_age(4 * 3600 + 60), "4h1m");
        assert_eq!(human_age(30 * 3600), "30h");
        assert_eq!(human_age(3 * 86400), "3d");
        assert_eq!(human_age(400 * 86400), "400d");
        assert_eq!(human_age(3 * 365 * 86400), "3y");
    }

    #[test]
    fn table_requests_are_recognised() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
        assert!(!wants_table(""));
    }

    #[test]
    fn pod_rows_have_the_upstream_columns() {
        let pods = find("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.244.0.5",
                       "containerStatuses": [{"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}});
        let table = table(pods, &[pod], "7", None, "Metadata", true);
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(&names[..5], ["Name", "Ready", "Status", "Restarts", "Age"]);
        let cells = &table["rows"][0]["cells"];
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], "3");
        assert_eq!(cells[5], "10.244.0.5");
        assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
