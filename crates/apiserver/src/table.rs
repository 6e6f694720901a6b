//! `meta.k8s.io/v1 Table` responses: what `kubectl get` prints. Columns follow upstream's
//! printers for the resources that have them; others get Name and Age.

use serde_json::{Value, json};

use crate::custom::json_path;
use crate::registry::{PrinterColumn, Resource};

/// Whether the client asked for a Table (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`).
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| {
        let params: Vec<&str> = first.split(';').map(str::trim).collect();
        params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io")
    })
}

/// Whether the client asked for metadata only (`as=PartialObjectMetadata` or
/// `as=PartialObjectMetadataList`, what metadata informers such as garbage collectors use).
pub fn wants_metadata(accept: &str) -> bool {
    accept.split(',').next().is_some_and(|first| {
        let params: Vec<&str> = first.split(';').map(str::trim).collect();
        params.contains(&"g=meta.k8s.io")
            && (params.contains(&"as=PartialObjectMetadata") || params.contains(&"as=PartialObjectMetadataList"))
    })
}

/// An object's metadata as a `PartialObjectMetadata`.
pub fn partial(object: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]})
}

/// A column: name, type, format, priority (1 = only with `-o wide`).
type Column = (&'static str, &'static str, &'static str, u8);

fn columns(resource: &Resource) -> Vec<Column> {
    let name: Column = ("Name", "string", "name", 0);
    let age: Column = ("Age", "string", "", 0);
    match resource.builtin() {
        "namespaces" => vec![name, ("Status", "string", "", 0), age],
        "configmaps" => vec![name, ("Data", "integer", "", 0), age],
        "priorityclasses" => vec![
            name,
            ("Value", "integer", "", 0),
            ("Global-Default", "boolean", "", 0),
            age,
            ("PreemptionPolicy", "string", "", 0),
        ],
        "secrets" => vec![name, ("Type", "string", "", 0), ("Data", "integer", "", 0), age],
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
        "events" => vec![
            ("Last Seen", "string", "", 0),
            ("Type", "string", "", 0),
            ("Reason", "string", "", 0),
            ("Object", "string", "", 0),
            ("Subobject", "string", "", 1),
            ("Source", "string", "", 1),
            ("Message", "string", "", 0),
            ("First Seen", "string", "", 1),
            ("Count", "string", "", 1),
            ("Name", "string", "", 1),
        ],
        "nodes" => vec![
            name,
            ("Status", "string", "", 0),
            ("Roles", "string", "", 0),
            age,
            ("Version", "string", "", 0),
            ("Internal-IP", "string", "", 1),
            ("External-IP", "string", "", 1),
            ("OS-Image", "string", "", 1),
            ("Kernel-Version", "string", "", 1),
            ("Container-Runtime", "string", "", 1),
        ],
        "replicasets" | "replicationcontrollers" => vec![
            name,
            ("Desired", "integer", "", 0),
            ("Current", "integer", "", 0),
            ("Ready", "integer", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "daemonsets" => vec![
            name,
            ("Desired", "integer", "", 0),
            ("Current", "integer", "", 0),
            ("Ready", "integer", "", 0),
            ("Up-to-date", "integer", "", 0),
            ("Available", "integer", "", 0),
            ("Node Selector", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "statefulsets" => {
            vec![name, ("Ready", "string", "", 0), age, ("Containers", "string", "", 1), ("Images", "string", "", 1)]
        }
        "jobs" => vec![
            name,
            ("Status", "string", "", 0),
            ("Completions", "string", "", 0),
            ("Duration", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "cronjobs" => vec![
            name,
            ("Schedule", "string", "", 0),
            ("Timezone", "string", "", 0),
            ("Suspend", "boolean", "", 0),
            ("Active", "integer", "", 0),
            ("Last Schedule", "string", "", 0),
            age,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        "endpoints" => vec![name, ("Endpoints", "string", "", 0), age],
        "serviceaccounts" => vec![name, ("Secrets", "string", "", 0), age],
        "leases" => vec![name, ("Holder", "string", "", 0), age],
        "mutatingwebhookconfigurations" | "validatingwebhookconfigurations" => {
            vec![name, ("Webhooks", "integer", "", 0), age]
        }
        "validatingadmissionpolicies" => {
            vec![name, ("Validations", "integer", "", 0), ("ParamKind", "string", "", 0), age]
        }
        "apiservices" => vec![name, ("Service", "string", "", 0), ("Available", "string", "", 0), age],
        "validatingadmissionpolicybindings" => {
            vec![name, ("PolicyName", "string", "", 0), ("ParamRef", "string", "", 0), age]
        }
        "networkpolicies" => vec![name, ("Pod-Selector", "string", "", 0), age],
        "controllerrevisions" => vec![name, ("Controller", "string", "", 0), ("Revision", "integer", "", 0), age],
        "storageclasses" => vec![
            name,
            ("Provisioner", "string", "", 0),
            ("ReclaimPolicy", "string", "", 0),
            ("VolumeBindingMode", "string", "", 0),
            ("AllowVolumeExpansion", "string", "", 0),
            age,
        ],
        "horizontalpodautoscalers" => vec![
            name,
            ("Reference", "string", "", 0),
            ("Targets", "string", "", 0),
            ("MinPods", "string", "", 0),
            ("MaxPods", "integer", "", 0),
            ("Replicas", "integer", "", 0),
            age,
        ],
        "ingresses" => vec![
            name,
            ("Class", "string", "", 0),
            ("Hosts", "string", "", 0),
            ("Address", "string", "", 0),
            ("Ports", "string", "", 0),
            age,
        ],
        "ingressclasses" => vec![name, ("Controller", "string", "", 0), ("Parameters", "string", "", 0), age],
        "persistentvolumes" => vec![
            name,
            ("Capacity", "string", "", 0),
            ("Access Modes", "string", "", 0),
            ("Reclaim Policy", "string", "", 0),
            ("Status", "string", "", 0),
            ("Claim", "string", "", 0),
            ("StorageClass", "string", "", 0),
            ("VolumeAttributesClass", "string", "", 0),
            ("Reason", "string", "", 0),
            age,
            ("VolumeMode", "string", "", 1),
        ],
        "persistentvolumeclaims" => vec![
            name,
            ("Status", "string", "", 0),
            ("Volume", "string", "", 0),
            ("Capacity", "string", "", 0),
            ("Access Modes", "string", "", 0),
            ("StorageClass", "string", "", 0),
            ("VolumeAttributesClass", "string", "", 0),
            age,
            ("VolumeMode", "string", "", 1),
        ],
        "limitranges" | "roles" | "clusterroles" => vec![name, ("Created At", "date", "", 0)],
        "resourcequotas" => vec![name, age, ("Request", "string", "", 0), ("Limit", "string", "", 0)],
        "endpointslices" => vec![
            name,
            ("AddressType", "string", "", 0),
            ("Ports", "string", "", 0),
            ("Endpoints", "string", "", 0),
            age,
        ],
        "poddisruptionbudgets" => vec![
            name,
            ("Min Available", "string", "", 0),
            ("Max Unavailable", "string", "", 0),
            ("Allowed Disruptions", "integer", "", 0),
            age,
        ],
        "rolebindings" | "clusterrolebindings" => vec![
            name,
            ("Role", "string", "", 0),
            age,
            ("Users", "string", "", 1),
            ("Groups", "string", "", 1),
            ("ServiceAccounts", "string", "", 1),
        ],
        "certificatesigningrequests" => vec![
            name,
            age,
            ("SignerName", "string", "", 0),
            ("Requestor", "string", "", 0),
            ("RequestedDuration", "string", "", 0),
            ("Condition", "string", "", 0),
        ],
        _ => vec![name, age],
    }
}

/// Access modes as kubectl abbreviates them: `RWO,ROX`.
fn access_modes(modes: &Value) -> String {
    let modes: Vec<&str> = modes
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(Value::as_str)
                .map(|mode| match mode {
                    "ReadWriteOnce" => "RWO",
                    "ReadOnlyMany" => "ROX",
                    "ReadWriteMany" => "RWX",
                    "ReadWriteOncePod" => "RWOP",
                    other => other,
                })
                .collect()
        })
        .unwrap_or_default();
    modes.join(",")
}

/// A ResourceQuota's `used/hard` pairs, requests (and plain counts) apart from limits.
fn quota_usage(object: &Value, limits: bool) -> String {
    let hard = object["status"]["hard"].as_object().or(object["spec"]["hard"].as_object());
    let pairs: Vec<String> = hard
        .into_iter()
        .flatten()
        .filter(|(resource, _)| resource.starts_with("limits.") == limits)
        .map(|(resource, hard)| {
            let used = object["status"]["used"][resource.as_str()].as_str().unwrap_or("0");
            format!("{resource}: {used}/{}", hard.as_str().unwrap_or(""))
        })
        .collect();
    pairs.join(", ")
}

/// Subjects of a binding of one kind, comma-separated (service accounts as `namespace/name`).
fn subjects(object: &Value, kind: &str) -> String {
    let names: Vec<String> = object["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["kind"] == kind)
        .map(|s| match (kind, s["namespace"].as_str()) {
            ("ServiceAccount", Some(ns)) => format!("{ns}/{}", s["name"].as_str().unwrap_or("")),
            _ => s["name"].as_str().unwrap_or("").to_string(),
        })
        .collect();
    names.join(", ")
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

/// The age of a timestamp, as a `date` printer column shows it.
pub fn age_of(timestamp: &str) -> String {
    age_since(Some(timestamp))
}

fn age_since(timestamp: Option<&str>) -> String {
    match timestamp.map(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)) {
        Some(Ok(then)) => human_age((time::OffsetDateTime::now_utc() - then).whole_seconds()),
        _ => "<unknown>".into(),
    }
}

/// The pod template's containers and images, and the selector, as `-o wide` shows them.
fn template_columns(object: &Value) -> (Value, Value, Value) {
    let template = if object["spec"]["jobTemplate"].is_object() {
        &object["spec"]["jobTemplate"]["spec"]["template"]
    } else {
        &object["spec"]["template"]
    };
    let containers = template["spec"]["containers"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = containers.iter().filter_map(|c| c["name"].as_str()).collect();
    let images: Vec<&str> = containers.iter().filter_map(|c| c["image"].as_str()).collect();
    let selector: Vec<String> = crate::selector::selector_labels(&object["spec"]["selector"])
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
        .unwrap_or_default();
    let selector = if selector.is_empty() { "<none>".to_string() } else { selector.join(",") };
    (json!(names.join(",")), json!(images.join(",")), json!(selector))
}

fn workload_cells(plural: &str, object: &Value, name: Value) -> Vec<Value> {
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    let status = &object["status"];
    let (containers, images, selector) = template_columns(object);
    match plural {
        "replicasets" | "replicationcontrollers" => vec![
            name,
            json!(object["spec"]["replicas"].as_i64().unwrap_or(1)),
            json!(n(&status["replicas"])),
            json!(n(&status["readyReplicas"])),
            json!(age(object)),
            containers,
            images,
            selector,
        ],
        "daemonsets" => {
            let node_selector: Vec<String> = object["spec"]["template"]["spec"]["nodeSelector"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            vec![
                name,
                json!(n(&status["desiredNumberScheduled"])),
                json!(n(&status["currentNumberScheduled"])),
                json!(n(&status["numberReady"])),
                json!(n(&status["updatedNumberScheduled"])),
                json!(n(&status["numberAvailable"])),
                json!(if node_selector.is_empty() { "<none>".to_string() } else { node_selector.join(",") }),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
        "statefulsets" => vec![
            name,
            json!(format!("{}/{}", n(&status["readyReplicas"]), object["spec"]["replicas"].as_i64().unwrap_or(1))),
            json!(age(object)),
            containers,
            images,
        ],
        "jobs" => {
            let completions = object["spec"]["completions"].as_i64();
            let succeeded = n(&status["succeeded"]);
            let condition = |kind: &str| {
                status["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == kind && c["status"] == "True"))
            };
            let state = if condition("Complete") {
                "Complete"
            } else if condition("Failed") {
                "Failed"
            } else if object["spec"]["suspend"] == json!(true) {
                "Suspended"
            } else {
                "Running"
            };
            let duration = match (status["startTime"].as_str(), status["completionTime"].as_str()) {
                (Some(start), end) => {
                    let parse =
                        |t: &str| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok();
                    let end = end.and_then(parse).unwrap_or_else(time::OffsetDateTime::now_utc);
                    parse(start).map(|start| human_age((end - start).whole_seconds())).unwrap_or_default()
                }
                _ => String::new(),
            };
            let completions = match completions {
                Some(total) => format!("{succeeded}/{total}"),
                None => format!("{succeeded}/1 of {}", object["spec"]["parallelism"].as_i64().unwrap_or(1)),
            };
            vec![
                name,
                json!(state),
                json!(completions),
                json!(duration),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
        _ => {
            let active = status["active"].as_array().map(Vec::len).unwrap_or(0);
            let last =
                status["lastScheduleTime"].as_str().map(|t| age_since(Some(t))).unwrap_or_else(|| "<none>".into());
            vec![
                name,
                json!(object["spec"]["schedule"].as_str().unwrap_or("")),
                json!(object["spec"]["timeZone"].as_str().unwrap_or("<none>")),
                json!(object["spec"]["suspend"] == json!(true)),
                json!(active),
                json!(last),
                json!(age(object)),
                containers,
                images,
                selector,
            ]
        }
    }
}

fn count(value: &Value) -> i64 {
    value.as_object().map(|m| m.len() as i64).unwrap_or(0)
}

/// A pod's STATUS column, as kubectl's printer words it: the phase, or the status reason, or
/// what an init container or the last troubled container says (`Init:0/1`, `CrashLoopBackOff`,
/// `Completed`, `ExitCode:1`), or `Terminating`.
fn pod_status(pod: &Value) -> String {
    let status = &pod["status"];
    let mut reason = status["phase"].as_str().unwrap_or("Pending").to_string();
    if let Some(given) = status["reason"].as_str().filter(|r| !r.is_empty()) {
        reason = given.to_string();
    }
    let exited = |terminated: &Value| match terminated["reason"].as_str().filter(|r| !r.is_empty()) {
        Some(r) => r.to_string(),
        None => match terminated["signal"].as_i64().filter(|s| *s != 0) {
            Some(signal) => format!("Signal:{signal}"),
            None => format!("ExitCode:{}", terminated["exitCode"].as_i64().unwrap_or(0)),
        },
    };
    let inits = status["initContainerStatuses"].as_array().cloned().unwrap_or_default();
    let init_total = pod["spec"]["initContainers"].as_array().map(Vec::len).unwrap_or(inits.len());
    let mut initializing = false;
    for (index, init) in inits.iter().enumerate() {
        let state = &init["state"];
        if state["terminated"].is_object() && state["terminated"]["exitCode"].as_i64() == Some(0) {
            continue;
        }
        initializing = true;
        reason = if state["terminated"].is_object() {
            format!("Init:{}", exited(&state["terminated"]))
        } else if let Some(waiting) =
            state["waiting"]["reason"].as_str().filter(|r| !r.is_empty() && *r != "PodInitializing")
        {
            format!("Init:{waiting}")
        } else {
            format!("Init:{index}/{init_total}")
        };
        break;
    }
    if !initializing {
        let mut running = false;
        let containers = status["containerStatuses"].as_array().cloned().unwrap_or_default();
        for container in containers.iter().rev() {
            let state = &container["state"];
            if let Some(waiting) = state["waiting"]["reason"].as_str().filter(|r| !r.is_empty()) {
                reason = waiting.to_string();
            } else if state["terminated"].is_object() {
                reason = exited(&state["terminated"]);
            } else if state["running"].is_object() && container["ready"] == json!(true) {
                running = true;
            }
        }
        if reason == "Completed" && running {
            let ready = status["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"));
            reason = if ready { "Running" } else { "NotReady" }.to_string();
        }
    }
    if pod["metadata"]["deletionTimestamp"].is_string() {
        reason = if status["reason"] == "NodeLost" { "Unknown" } else { "Terminating" }.to_string();
    }
    reason
}

fn cells(resource: &Resource, object: &Value) -> Vec<Value> {
    let name = json!(object["metadata"]["name"]);
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let none_if_empty = |v: String| {
        if v.is_empty() { "<none>".to_string() } else { v }
    };
    match resource.builtin() {
        "namespaces" => vec![name, json!(s(&object["status"]["phase"])), json!(age(object))],
        "configmaps" => {
            let data = count(&object["data"]) + count(&object["binaryData"]);
            vec![name, json!(data), json!(age(object))]
        }
        "secrets" => vec![name, json!(s(&object["type"])), json!(count(&object["data"])), json!(age(object))],
        "priorityclasses" => vec![
            name,
            json!(object["value"].as_i64().unwrap_or(0)),
            json!(object["globalDefault"].as_bool().unwrap_or(false)),
            json!(age(object)),
            json!(object["preemptionPolicy"].as_str().unwrap_or("PreemptLowerPriority")),
        ],
        "pods" => {
            let statuses = object["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
            let total = object["spec"]["containers"].as_array().map(Vec::len).unwrap_or(0);
            let ready = statuses.iter().filter(|c| c["ready"] == json!(true)).count();
            let restarts: i64 = statuses.iter().map(|c| c["restartCount"].as_i64().unwrap_or(0)).sum();
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(object)),
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
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            // Upstream's printer: a LoadBalancer's ingress addresses (then its external IPs),
            // `<pending>` until it has some; else the external IPs.
            let mut external: Vec<String> = Vec::new();
            let kind = object["spec"]["type"].as_str().unwrap_or("ClusterIP");
            if kind == "LoadBalancer" {
                for ingress in object["status"]["loadBalancer"]["ingress"].as_array().into_iter().flatten() {
                    if let Some(address) = ingress["ip"].as_str().or(ingress["hostname"].as_str()) {
                        external.push(address.to_string());
                    }
                }
            }
            external.extend(
                object["spec"]["externalIPs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string)),
            );
            let external = match external.is_empty() {
                true if kind == "LoadBalancer" => "<pending>".to_string(),
                _ => none_if_empty(external.join(",")),
            };
            vec![
                name,
                json!(kind),
                json!(none_if_empty(s(&object["spec"]["clusterIP"]))),
                json!(external),
                json!(none_if_empty(ports.join(","))),
                json!(age(object)),
                json!(none_if_empty(selector.join(","))),
            ]
        }
        "deployments" => {
            let n = |v: &Value| v.as_i64().unwrap_or(0);
            let containers = object["spec"]["template"]["spec"]["containers"].as_array().cloned().unwrap_or_default();
            let names: Vec<String> = containers.iter().map(|c| s(&c["name"])).collect();
            let images: Vec<String> = containers.iter().map(|c| s(&c["image"])).collect();
            let selector: Vec<String> = object["spec"]["selector"]["matchLabels"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
            vec![
                name,
                json!(format!("{}/{replicas}", n(&object["status"]["readyReplicas"]))),
                json!(n(&object["status"]["updatedReplicas"])),
                json!(n(&object["status"]["availableReplicas"])),
                json!(age(object)),
                json!(names.join(",")),
                json!(images.join(",")),
                json!(none_if_empty(selector.join(","))),
            ]
        }
        "events" => {
            // Both groups' Events: events.k8s.io names the core fields differently.
            let converted;
            let object = match &resource.conversion {
                Some(conversion) => {
                    converted = (conversion.to_storage)(object.clone());
                    &converted
                }
                None => object,
            };
            let last = ["lastTimestamp", "eventTime"]
                .iter()
                .find_map(|f| object[*f].as_str())
                .or_else(|| object["metadata"]["creationTimestamp"].as_str());
            let first = object["firstTimestamp"].as_str().or(last);
            let involved = &object["involvedObject"];
            let kind = involved["kind"].as_str().unwrap_or("").to_lowercase();
            let source = [object["source"]["component"].as_str(), object["source"]["host"].as_str()]
                .iter()
                .flatten()
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            vec![
                json!(age_since(last)),
                json!(s(&object["type"])),
                json!(s(&object["reason"])),
                json!(format!("{kind}/{}", s(&involved["name"]))),
                json!(s(&involved["fieldPath"])),
                json!(source),
                json!(s(&object["message"])),
                json!(age_since(first)),
                json!(object["count"].as_i64().unwrap_or(1).to_string()),
                name,
            ]
        }
        "nodes" => {
            let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let ready = conditions.iter().find(|c| c["type"] == "Ready");
            let mut status = match ready.and_then(|c| c["status"].as_str()) {
                Some("True") => "Ready".to_string(),
                _ => "NotReady".to_string(),
            };
            if object["spec"]["unschedulable"] == json!(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = object["metadata"]["labels"]
                .as_object()
                .map(|labels| {
                    labels
                        .keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/").map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let address = |kind: &str| {
                object["status"]["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["type"] == kind))
                    .and_then(|x| x["address"].as_str())
                    .unwrap_or("<none>")
                    .to_string()
            };
            let info = &object["status"]["nodeInfo"];
            vec![
                name,
                json!(status),
                json!(none_if_empty(roles.join(","))),
                json!(age(object)),
                json!(s(&info["kubeletVersion"])),
                json!(address("InternalIP")),
                json!(address("ExternalIP")),
                json!(none_if_empty(s(&info["osImage"]))),
                json!(none_if_empty(s(&info["kernelVersion"]))),
                json!(none_if_empty(s(&info["containerRuntimeVersion"]))),
            ]
        }
        "replicasets" | "replicationcontrollers" | "daemonsets" | "statefulsets" | "jobs" | "cronjobs" => {
            workload_cells(resource.plural, object, name)
        }
        "endpoints" => {
            let mut addresses = Vec::new();
            for subset in object["subsets"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                for address in subset["addresses"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                    for port in subset["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                        addresses.push(format!("{}:{}", s(&address["ip"]), port["port"]));
                    }
                }
            }
            let shown = if addresses.len() > 3 {
                format!("{} + {} more...", addresses[..3].join(","), addresses.len() - 3)
            } else {
                addresses.join(",")
            };
            vec![name, json!(none_if_empty(shown)), json!(age(object))]
        }
        "serviceaccounts" => {
            let secrets = object["secrets"].as_array().map(Vec::len).unwrap_or(0);
            vec![name, json!(secrets.to_string()), json!(age(object))]
        }
        "leases" => vec![name, json!(s(&object["spec"]["holderIdentity"])), json!(age(object))],
        "mutatingwebhookconfigurations" | "validatingwebhookconfigurations" => {
            vec![name, json!(object["webhooks"].as_array().map_or(0, Vec::len)), json!(age(object))]
        }
        "validatingadmissionpolicies" => {
            let kind = &object["spec"]["paramKind"];
            let param_kind = match (kind["apiVersion"].as_str(), kind["kind"].as_str()) {
                (Some(version), Some(kind)) => format!("{version}/{kind}"),
                _ => "<unset>".into(),
            };
            let validations = object["spec"]["validations"].as_array().map_or(0, Vec::len);
            vec![name, json!(validations), json!(param_kind), json!(age(object))]
        }
        "apiservices" => {
            let service = &object["spec"]["service"];
            let shown = match (service["namespace"].as_str(), service["name"].as_str()) {
                (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
                _ => "Local".into(),
            };
            let available = object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Available")
                .map(|c| match (c["status"].as_str(), c["reason"].as_str()) {
                    (Some("True"), _) => "True".to_string(),
                    (Some(status), Some(reason)) => format!("{status} ({reason})"),
                    (Some(status), None) => status.to_string(),
                    _ => "Unknown".into(),
                })
                .unwrap_or_else(|| "Unknown".into());
            vec![name, json!(shown), json!(available), json!(age(object))]
        }
        "validatingadmissionpolicybindings" => {
            let reference = &object["spec"]["paramRef"];
            let param_ref = match (reference["namespace"].as_str(), reference["name"].as_str()) {
                (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
                (None, Some(name)) => format!("*/{name}"),
                _ if reference["selector"].is_object() => "*/*".into(),
                _ => "<unset>".into(),
            };
            vec![name, json!(s(&object["spec"]["policyName"])), json!(param_ref), json!(age(object))]
        }
        "ingresses" => {
            let spec = &object["spec"];
            let mut hosts: Vec<String> = spec["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["host"].as_str().map(str::to_string))
                .collect();
            hosts.dedup();
            let hosts = if hosts.is_empty() { "*".to_string() } else { hosts.join(",") };
            let addresses: Vec<String> = object["status"]["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str().or(i["hostname"].as_str()).map(str::to_string))
                .collect();
            let ports = if spec["tls"].as_array().is_some_and(|t| !t.is_empty()) { "80, 443" } else { "80" };
            let class = spec["ingressClassName"].as_str().unwrap_or("<none>");
            vec![name, json!(class), json!(hosts), json!(addresses.join(",")), json!(ports), json!(age(object))]
        }
        "ingressclasses" => {
            let parameters = &object["spec"]["parameters"];
            let shown = match parameters["kind"].as_str() {
                Some(kind) => {
                    let group = parameters["apiGroup"].as_str().map(|g| format!(".{g}")).unwrap_or_default();
                    format!("{kind}{group}/{}", parameters["name"].as_str().unwrap_or_default())
                }
                None => "<none>".to_string(),
            };
            vec![name, json!(s(&object["spec"]["controller"])), json!(shown), json!(age(object))]
        }
        "horizontalpodautoscalers" => {
            // A v1 object shows as the v2 one it is.
            let converted;
            let object = if object["apiVersion"] == "autoscaling/v1" {
                converted = crate::autoscaling::to_v2(object.clone());
                &converted
            } else {
                object
            };
            let spec = &object["spec"];
            let target = &spec["scaleTargetRef"];
            let reference = format!("{}/{}", s(&target["kind"]), s(&target["name"]));
            // `cpu: 40%/50%` per metric, as upstream prints them (`<unknown>` before a reading).
            let current = object["status"]["currentMetrics"].as_array().cloned().unwrap_or_default();
            let targets: Vec<String> = spec["metrics"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["type"] == "Resource")
                .map(|m| {
                    let resource = s(&m["resource"]["name"]);
                    let now = current.iter().find(|c| c["resource"]["name"] == resource.as_str());
                    let wanted = &m["resource"]["target"];
                    match wanted["averageUtilization"].as_i64() {
                        Some(percent) => {
                            let seen = now
                                .and_then(|c| c["resource"]["current"]["averageUtilization"].as_i64())
                                .map_or("<unknown>".to_string(), |p| format!("{p}%"));
                            format!("{resource}: {seen}/{percent}%")
                        }
                        None => {
                            let seen = now
                                .and_then(|c| c["resource"]["current"]["averageValue"].as_str())
                                .unwrap_or("<unknown>")
                                .to_string();
                            format!("{resource}: {seen}/{}", s(&wanted["averageValue"]))
                        }
                    }
                })
                .collect();
            let min = spec["minReplicas"].as_i64().unwrap_or(1);
            vec![
                name,
                json!(reference),
                json!(if targets.is_empty() { "<none>".to_string() } else { targets.join(", ") }),
                json!(min.to_string()),
                json!(spec["maxReplicas"].as_i64().unwrap_or(0)),
                json!(object["status"]["currentReplicas"].as_i64().unwrap_or(0)),
                json!(age(object)),
            ]
        }
        "storageclasses" => {
            let mut shown = s(&object["metadata"]["name"]);
            if object["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true" {
                shown.push_str(" (default)");
            }
            vec![
                json!(shown),
                json!(s(&object["provisioner"])),
                json!(object["reclaimPolicy"].as_str().unwrap_or("Delete")),
                json!(object["volumeBindingMode"].as_str().unwrap_or("Immediate")),
                json!(object["allowVolumeExpansion"].as_bool().unwrap_or(false).to_string()),
                json!(age(object)),
            ]
        }
        "controllerrevisions" => {
            let owner = object["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["controller"] == true)
                .map(|o| {
                    let group = s(&o["apiVersion"])
                        .split('/')
                        .next()
                        .filter(|_| s(&o["apiVersion"]).contains('/'))
                        .map(|g| format!(".{g}"))
                        .unwrap_or_default();
                    format!("{}{group}/{}", s(&o["kind"]).to_lowercase(), s(&o["name"]))
                })
                .unwrap_or_else(|| "<none>".into());
            vec![name, json!(owner), json!(object["revision"].as_i64().unwrap_or(0)), json!(age(object))]
        }
        "networkpolicies" => {
            let selector = &object["spec"]["podSelector"];
            let mut terms: Vec<String> = selector["matchLabels"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect())
                .unwrap_or_default();
            for e in selector["matchExpressions"].as_array().into_iter().flatten() {
                let values: Vec<String> = e["values"].as_array().into_iter().flatten().map(s).collect();
                let key = s(&e["key"]);
                terms.push(match e["operator"].as_str().unwrap_or_default() {
                    "In" => format!("{key} in ({})", values.join(",")),
                    "NotIn" => format!("{key} notin ({})", values.join(",")),
                    "DoesNotExist" => format!("!{key}"),
                    _ => key,
                });
            }
            let shown = if terms.is_empty() { "<none>".to_string() } else { terms.join(",") };
            vec![name, json!(shown), json!(age(object))]
        }
        "persistentvolumes" => {
            let claim = &object["spec"]["claimRef"];
            let claim = match (claim["namespace"].as_str(), claim["name"].as_str()) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                _ => String::new(),
            };
            vec![
                name,
                json!(s(&object["spec"]["capacity"]["storage"])),
                json!(access_modes(&object["spec"]["accessModes"])),
                json!(s(&object["spec"]["persistentVolumeReclaimPolicy"])),
                json!(s(&object["status"]["phase"])),
                json!(claim),
                json!(s(&object["spec"]["storageClassName"])),
                json!(object["spec"]["volumeAttributesClassName"].as_str().unwrap_or("<unset>")),
                json!(s(&object["status"]["reason"])),
                json!(age(object)),
                json!(object["spec"]["volumeMode"].as_str().unwrap_or("Filesystem")),
            ]
        }
        "persistentvolumeclaims" => {
            let phase = if object["metadata"]["deletionTimestamp"].is_string() {
                "Terminating".to_string()
            } else {
                object["status"]["phase"].as_str().unwrap_or("Pending").to_string()
            };
            let bound = phase == "Bound";
            vec![
                name,
                json!(phase),
                json!(s(&object["spec"]["volumeName"])),
                json!(if bound { s(&object["status"]["capacity"]["storage"]) } else { String::new() }),
                json!(if bound { access_modes(&object["status"]["accessModes"]) } else { String::new() }),
                json!(s(&object["spec"]["storageClassName"])),
                json!(object["spec"]["volumeAttributesClassName"].as_str().unwrap_or("<unset>")),
                json!(age(object)),
                json!(object["spec"]["volumeMode"].as_str().unwrap_or("Filesystem")),
            ]
        }
        "limitranges" | "roles" | "clusterroles" => vec![name, json!(s(&object["metadata"]["creationTimestamp"]))],
        "resourcequotas" => {
            vec![name, json!(age(object)), json!(quota_usage(object, false)), json!(quota_usage(object, true))]
        }
        "endpointslices" => {
            let ports: Vec<String> = object["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["port"].as_i64())
                .map(|p| p.to_string())
                .collect();
            let addresses: Vec<&str> = object["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str))
                .collect();
            let shown = if addresses.len() > 3 {
                format!("{} + {} more...", addresses[..3].join(","), addresses.len() - 3)
            } else if addresses.is_empty() {
                "<unset>".to_string()
            } else {
                addresses.join(",")
            };
            vec![
                name,
                json!(s(&object["addressType"])),
                json!(if ports.is_empty() { "<unset>".to_string() } else { ports.join(",") }),
                json!(shown),
                json!(age(object)),
            ]
        }
        "poddisruptionbudgets" => {
            let bound = |v: &Value| match v {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => "N/A".to_string(),
            };
            vec![
                name,
                json!(bound(&object["spec"]["minAvailable"])),
                json!(bound(&object["spec"]["maxUnavailable"])),
                json!(object["status"]["disruptionsAllowed"].as_i64().unwrap_or(0)),
                json!(age(object)),
            ]
        }
        "rolebindings" | "clusterrolebindings" => vec![
            name,
            json!(format!("{}/{}", s(&object["roleRef"]["kind"]), s(&object["roleRef"]["name"]))),
            json!(age(object)),
            json!(subjects(object, "User")),
            json!(subjects(object, "Group")),
            json!(subjects(object, "ServiceAccount")),
        ],
        "certificatesigningrequests" => {
            let conditions: Vec<&str> = object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["type"].as_str())
                .collect();
            // Upstream's order: Denied, else Approved, else Pending; then Failed; then Issued.
            let mut condition = if conditions.contains(&"Denied") {
                "Denied".to_string()
            } else if conditions.contains(&"Approved") {
                "Approved".to_string()
            } else {
                "Pending".to_string()
            };
            if conditions.contains(&"Failed") {
                condition.push_str(",Failed");
            }
            if object["status"]["certificate"].as_str().is_some_and(|c| !c.is_empty()) {
                condition.push_str(",Issued");
            }
            vec![
                name,
                json!(age(object)),
                json!(s(&object["spec"]["signerName"])),
                json!(s(&object["spec"]["username"])),
                json!(object["spec"]["expirationSeconds"].as_i64().map(human_age).unwrap_or_else(|| "<none>".into())),
                json!(condition),
            ]
        }
        _ => vec![name, json!(age(object))],
    }
}

fn row(resource: &Resource, object: &Value, include_object: &str) -> Value {
    let embedded = match include_object {
        "None" => Value::Null,
        "Object" => object.clone(),
        _ => partial(object),
    };
    let cells = match resource.custom {
        Some(custom) => custom_cells(custom, object),
        None => cells(resource, object),
    };
    json!({"cells": cells, "object": embedded})
}

/// A custom resource's columns: the name, then its definition's printer columns (the age
/// when it declares none), as upstream's table convertor makes them.
fn custom_definitions(custom: &crate::registry::Custom) -> Vec<Value> {
    let mut definitions = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names", "priority": 0})];
    if custom.columns.is_empty() {
        definitions.push(json!({"name": "Age", "type": "date", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0}));
    }
    for column in &custom.columns {
        definitions.push(json!({"name": column.name, "type": column.kind, "format": column.format,
            "description": column.description, "priority": column.priority}));
    }
    definitions
}

fn custom_cells(custom: &crate::registry::Custom, object: &Value) -> Vec<Value> {
    let mut cells = vec![json!(object["metadata"]["name"])];
    if custom.columns.is_empty() {
        cells.push(json!(age(object)));
    }
    cells.extend(custom.columns.iter().map(|column| column_value(column, object)));
    cells
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
    let definitions: Vec<Value> = if with_columns && let Some(custom) = resource.custom {
        custom_definitions(custom)
    } else if with_columns {
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

/// A printer column's cell: the value at its JSONPath (`.spec.replicas`, `.status.conditions[0].type`).
pub fn column_value(column: &PrinterColumn, object: &Value) -> Value {
    let value = json_path(object, &column.json_path);
    match value {
        None => Value::Null,
        Some(value) if column.kind == "date" => match value.as_str() {
            Some(timestamp) => json!(age_of(timestamp)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::find;

    #[test]
    fn every_resource_has_as_many_cells_as_columns() {
        let sparse = json!({"metadata": {"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z"}});
        let full = json!({"metadata": {"name": "x"}, "spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
                          "status": {"replicas": 1}, "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}]});
        for resource in crate::registry::RESOURCES {
            for object in [&sparse, &full] {
                let table = table(resource, std::slice::from_ref(object), "1", None, "None", true);
                let columns = table["columnDefinitions"].as_array().unwrap().len();
                let cells = table["rows"][0]["cells"].as_array().unwrap().len();
                assert_eq!(cells, columns, "{}", resource.plural);
            }
        }
    }

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
        let names: Vec<&str> =
            table["columnDefinitions"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(&names[..5], ["Name", "Ready", "Status", "Restarts", "Age"]);
        let cells = &table["rows"][0]["cells"];
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], "3");
        assert_eq!(cells[5], "10.244.0.5");
        assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }

    #[test]
    fn pod_status_reads_like_kubectl() {
        let pod = |status: Value| json!({"spec": {"containers": [{"name": "c"}]}, "status": status});
        assert_eq!(
            pod_status(&pod(json!({"phase": "Running",
            "containerStatuses": [{"ready": true, "state": {"running": {}}}]}))),
            "Running"
        );
        assert_eq!(
            pod_status(&pod(json!({"phase": "Succeeded",
            "containerStatuses": [{"state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}))),
            "Completed"
        );
        assert_eq!(
            pod_status(&pod(json!({"phase": "Failed",
            "containerStatuses": [{"state": {"terminated": {"exitCode": 2}}}]}))),
            "ExitCode:2"
        );
        assert_eq!(
            pod_status(&pod(json!({"phase": "Running",
            "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}))),
            "CrashLoopBackOff"
        );
        assert_eq!(
            pod_status(&pod(json!({"phase": "Pending",
            "initContainerStatuses": [{"state": {"running": {}}}]}))),
            "Init:0/1"
        );
        assert_eq!(pod_status(&pod(json!({"phase": "Failed", "reason": "Evicted"}))), "Evicted");
        let mut leaving = pod(json!({"phase": "Running"}));
        leaving["metadata"] = json!({"deletionTimestamp": "2026-01-01T00:00:00Z"});
        assert_eq!(pod_status(&leaving), "Terminating");
    }
}
