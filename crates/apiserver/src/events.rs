//! `events.k8s.io/v1` Events are core `v1` Events under other field names, stored as core Events
//! (as upstream stores them), so an event posted through either group is read through both:
//! a controller's `events.k8s.io` event shows in `kubectl describe`, which reads core events.

use serde_json::{Map, Value, json};

/// (events.k8s.io name, core name)
const RENAMED: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn rename(object: Value, to_core: bool, api_version: &str) -> Value {
    let Value::Object(map) = object else { return object };
    let mut out = Map::with_capacity(map.len());
    for (key, value) in map {
        let renamed = RENAMED
            .iter()
            .find(|(events, core)| if to_core { events == &key } else { core == &key })
            .map(|(events, core)| if to_core { core } else { events });
        out.insert(renamed.map(|r| r.to_string()).unwrap_or(key), value);
    }
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!("Event"));
    Value::Object(out)
}

/// An events.k8s.io/v1 Event as the core v1 Event it is stored as.
pub fn to_core(event: Value) -> Value {
    rename(event, true, "v1")
}

/// A stored core v1 Event as an events.k8s.io/v1 Event.
pub fn from_core(event: Value) -> Value {
    rename(event, false, "events.k8s.io/v1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_forms_convert_both_ways() {
        let new = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "regarding": {"kind": "Pod", "name": "web"}, "note": "pulled", "reason": "Pulled",
            "reportingController": "tugboat/kubelet", "reportingInstance": "n1", "action": "Pull",
            "eventTime": "2026-11-22T07:00:00.000000Z", "type": "Normal",
        });
        let core = to_core(new.clone());
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "web");
        assert_eq!(core["message"], "pulled");
        assert_eq!(core["reportingComponent"], "tugboat/kubelet");
        assert!(core.get("note").is_none());
        assert_eq!(from_core(core), new);
    }
}
