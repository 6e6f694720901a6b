//! Services: defaults, ClusterIP allocation from `--service-cidr`, NodePorts from
//! 30000-32767. Every allocated address or port is a claim key in the store
//! (`/registry/tugboat/serviceips/<ip>`, `/registry/tugboat/servicenodeports/<port>`), created
//! atomically, so two concurrent creates can never share one, and released on delete.

use std::net::Ipv4Addr;

use serde_json::{Value, json};
use tugboat_store::{Store, StoreError};

use crate::status::{ApiError, Cause};

/// The range of ClusterIPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr {
    base: u32,
    prefix: u8,
}

impl Default for ServiceCidr {
    fn default() -> Self {
        ServiceCidr { base: u32::from(Ipv4Addr::new(10, 96, 0, 0)), prefix: 16 }
    }
}

impl std::str::FromStr for ServiceCidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (ip, prefix) =
            text.split_once('/').ok_or_else(|| format!("{text:?} is not a CIDR such as 10.96.0.0/16"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| format!("{text:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{text:?}: bad prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("{text:?}: the prefix length must be between 8 and 30"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(ServiceCidr { base: u32::from(ip) & mask, prefix })
    }
}

impl std::fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl ServiceCidr {
    fn size(&self) -> u32 {
        1u32 << (32 - self.prefix)
    }

    /// The first usable address: the `kubernetes` Service's.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        ip > self.base && ip < self.base + self.size() - 1
    }
}

const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

fn ip_claim(ip: &str) -> String {
    format!("/registry/tugboat/serviceips/{ip}")
}

fn port_claim(port: i64) -> String {
    format!("/registry/tugboat/servicenodeports/{port}")
}

fn invalid(name: &str, field: &str, message: String) -> ApiError {
    ApiError::invalid("", "Service", name, vec![Cause { reason: "FieldValueInvalid", message, field: field.into() }])
}

fn service_type(service: &Value) -> &str {
    service["spec"]["type"].as_str().unwrap_or("ClusterIP")
}

fn needs_node_ports(service: &Value) -> bool {
    matches!(service_type(service), "NodePort" | "LoadBalancer")
}

/// Upstream's defaults and the checks that need no store.
pub fn default_and_validate(service: &mut Value) -> Result<(), ApiError> {
    let name = service["metadata"]["name"].as_str().unwrap_or("").to_string();
    // Upstream's status.loadBalancer is a struct, not a pointer: always there, `{}` at least
    // (clients assert it on the Service a create returns).
    if !service["status"].is_object() {
        service["status"] = json!({});
    }
    if !service["status"]["loadBalancer"].is_object() {
        service["status"]["loadBalancer"] = json!({});
    }
    if !service["spec"].is_object() {
        service["spec"] = json!({});
    }
    let spec = &mut service["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    if !matches!(kind.as_str(), "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") {
        return Err(invalid(
            &name,
            "spec.type",
            format!(
                "Unsupported value: {kind:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
            ),
        ));
    }
    spec["type"] = json!(kind);
    spec.as_object_mut().expect("an object").entry("sessionAffinity").or_insert(json!("None"));
    if kind != "ExternalName" {
        spec.as_object_mut().expect("an object").entry("internalTrafficPolicy").or_insert(json!("Cluster"));
    }
    if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
        spec.as_object_mut().expect("an object").entry("externalTrafficPolicy").or_insert(json!("Cluster"));
    }
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    let headless = spec["clusterIP"] == "None";
    if ports.is_empty() && !headless && kind != "ExternalName" {
        return Err(ApiError::invalid(
            "",
            "Service",
            &name,
            vec![Cause { reason: "FieldValueRequired", message: "Required value".into(), field: "spec.ports".into() }],
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut defaulted = Vec::with_capacity(ports.len());
    for (i, mut port) in ports.into_iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let number = port["port"].as_i64().unwrap_or(0);
        if !(1..=65535).contains(&number) {
            return Err(invalid(
                &name,
                &format!("{field}.port"),
                format!("Invalid value: {number}: must be between 1 and 65535, inclusive"),
            ));
        }
        let port_name = port["name"].as_str().unwrap_or("").to_string();
        if port_name.is_empty() && i > 0
            || (i == 0 && port_name.is_empty() && spec["ports"].as_array().is_some_and(|p| p.len() > 1))
        {
            return Err(ApiError::invalid(
                "",
                "Service",
                &name,
                vec![Cause {
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                    field: format!("{field}.name"),
                }],
            ));
        }
        if !port_name.is_empty() && !names.insert(port_name.clone()) {
            return Err(ApiError::invalid(
                "",
                "Service",
                &name,
                vec![Cause {
                    reason: "FieldValueDuplicate",
                    message: format!("Duplicate value: {port_name:?}"),
                    field: format!("{field}.name"),
                }],
            ));
        }
        let map = port.as_object_mut().ok_or_else(|| invalid(&name, &field, "must be an object".into()))?;
        map.entry("protocol").or_insert(json!("TCP"));
        map.entry("targetPort").or_insert(json!(number));
        if let Some(node_port) = map.get("nodePort").and_then(Value::as_i64) {
            if !matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
                return Err(invalid(
                    &name,
                    &format!("{field}.nodePort"),
                    format!("Forbidden: may not be used when `type` is '{kind}'"),
                ));
            }
            if !NODE_PORTS.contains(&(node_port as u16)) || node_port > i64::from(u16::MAX) {
                return Err(invalid(
                    &name,
                    &format!("{field}.nodePort"),
                    format!(
                        "Invalid value: {node_port}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                    ),
                ));
            }
        }
        defaulted.push(port);
    }
    if !defaulted.is_empty() {
        spec["ports"] = Value::Array(defaulted);
    }
    Ok(())
}

async fn claim(store: &dyn Store, key: &str, owner: &str) -> Result<bool, ApiError> {
    match store.create(key, owner.as_bytes().to_vec()).await {
        Ok(_) => Ok(true),
        Err(StoreError::AlreadyExists { .. }) => Ok(false),
        Err(error) => Err(ApiError::from_store(error, "", "services", owner)),
    }
}

/// Random-ish starting points for the scans, so that allocations spread over the range.
fn start_offset(size: u32) -> u32 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) % size.max(1)
}

/// Allocates what a new Service needs (ClusterIP, NodePorts); returns the claim keys taken, to
/// release if the create fails.
pub async fn allocate(store: &dyn Store, cidr: ServiceCidr, service: &mut Value) -> Result<Vec<String>, ApiError> {
    let mut claims = Vec::new();
    let result = allocate_into(store, cidr, service, &mut claims).await;
    if result.is_err() {
        release_claims(store, &claims).await;
    }
    result.map(|()| claims)
}

/// The Service's name, and `namespace/name`: what its claims record as their owner.
fn name_and_owner(service: &Value) -> (String, String) {
    let name = service["metadata"]["name"].as_str().unwrap_or("").to_string();
    let owner = format!("{}/{name}", service["metadata"]["namespace"].as_str().unwrap_or(""));
    (name, owner)
}

/// Claims the first free candidate, scanning `size` candidates from a random start, so that
/// allocations spread over the range; `None` when every one is taken.
async fn claim_first_free(
    store: &dyn Store,
    owner: &str,
    size: u32,
    candidate: impl Fn(u32) -> String,
    key: impl Fn(&str) -> String,
) -> Result<Option<String>, ApiError> {
    let start = start_offset(size);
    for step in 0..size {
        let value = candidate((start + step) % size);
        if claim(store, &key(&value), owner).await? {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

async fn allocate_into(
    store: &dyn Store,
    cidr: ServiceCidr,
    service: &mut Value,
    claims: &mut Vec<String>,
) -> Result<(), ApiError> {
    let (name, owner) = name_and_owner(service);
    if service_type(service) != "ExternalName" && service["spec"]["clusterIP"] != "None" {
        let requested = service["spec"]["clusterIP"].as_str().filter(|ip| !ip.is_empty()).map(str::to_string);
        let ip = match requested {
            Some(text) => {
                let ip: Ipv4Addr = text.parse().map_err(|_| {
                    invalid(&name, "spec.clusterIPs[0]", format!("Invalid value: {text:?}: must be a valid IP address"))
                })?;
                if !cidr.contains(ip) {
                    return Err(invalid(
                        &name,
                        "spec.clusterIPs[0]",
                        format!(
                            "Invalid value: {text:?}: failed to allocate IP {text}: the provided IP ({text}) is not in the valid range. The range of valid IPs is {cidr}"
                        ),
                    ));
                }
                if !claim(store, &ip_claim(&text), &owner).await? {
                    return Err(invalid(
                        &name,
                        "spec.clusterIPs[0]",
                        format!(
                            "Invalid value: {text:?}: failed to allocate IP {text}: provided IP is already allocated"
                        ),
                    ));
                }
                text
            }
            None => {
                // Offsets 2.. (the first address belongs to the `kubernetes` Service).
                let usable = cidr.size() - 3;
                let candidate = |offset: u32| Ipv4Addr::from(cidr.base + 2 + offset).to_string();
                let found = claim_first_free(store, &owner, usable, candidate, ip_claim).await?;
                found.ok_or_else(|| {
                    invalid(
                        &name,
                        "spec.clusterIPs",
                        format!("Invalid value: failed to allocate a serviceIP: range {cidr} is full"),
                    )
                })?
            }
        };
        claims.push(ip_claim(&ip));
        service["spec"]["clusterIP"] = json!(ip);
        service["spec"]["clusterIPs"] = json!([ip]);
        service["spec"]["ipFamilies"] = json!(["IPv4"]);
        service["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    } else if service["spec"]["clusterIP"] == "None" {
        service["spec"]["clusterIPs"] = json!(["None"]);
        service["spec"]["ipFamilies"] = json!(["IPv4"]);
        service["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    }
    allocate_node_ports(store, service, &owner, claims).await
}

async fn allocate_node_ports(
    store: &dyn Store,
    service: &mut Value,
    owner: &str,
    claims: &mut Vec<String>,
) -> Result<(), ApiError> {
    if !needs_node_ports(service) {
        return Ok(());
    }
    let name = service["metadata"]["name"].as_str().unwrap_or("").to_string();
    let count = service["spec"]["ports"].as_array().map(Vec::len).unwrap_or(0);
    for i in 0..count {
        let field = format!("spec.ports[{i}].nodePort");
        match service["spec"]["ports"][i]["nodePort"].as_i64() {
            Some(port) => {
                if !claims.contains(&port_claim(port)) && !claim(store, &port_claim(port), owner).await? {
                    // Already ours from before this write is fine; another Service's is not.
                    let holder = store.get(&port_claim(port), None).await.ok().flatten();
                    if holder.is_none_or(|kv| kv.value != owner.as_bytes()) {
                        return Err(invalid(
                            &name,
                            &field,
                            format!("Invalid value: {port}: provided port is already allocated"),
                        ));
                    }
                }
                claims.push(port_claim(port));
            }
            None => {
                let size = u32::from(NODE_PORTS.end() - NODE_PORTS.start()) + 1;
                let candidate = |offset: u32| (u32::from(*NODE_PORTS.start()) + offset).to_string();
                let key = |port: &str| port_claim(port.parse().unwrap_or_default());
                let found = claim_first_free(store, owner, size, candidate, key).await?;
                let found = found.and_then(|port| port.parse::<i64>().ok());
                let port = found.ok_or_else(|| invalid(&name, &field, "Invalid value: no free node port".into()))?;
                claims.push(port_claim(port));
                service["spec"]["ports"][i]["nodePort"] = json!(port);
            }
        }
    }
    Ok(())
}

/// On update: the ClusterIP is immutable (and kept when the new object leaves it out), node
/// ports are kept per port number; ports a type change now needs are allocated.
/// Upstream's `dropTypeDependentFields`: a Service changing to ExternalName loses the cluster
/// IPs and node ports the update left as they were (a client changes only the type).
pub fn drop_type_dependent_fields(old: &Value, service: &mut Value) {
    if service_type(old) == "ExternalName" || service_type(service) != "ExternalName" {
        return;
    }
    if let Some(spec) = service["spec"].as_object_mut() {
        for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "externalTrafficPolicy"] {
            if spec.get(field) == old["spec"].get(field) {
                spec.remove(field);
            }
        }
    }
    let old_ports = old["spec"]["ports"].as_array().cloned().unwrap_or_default();
    for port in service["spec"]["ports"].as_array_mut().into_iter().flatten() {
        let kept = old_ports.iter().any(|p| p["nodePort"] == port["nodePort"]);
        if let Some(port) = port.as_object_mut().filter(|_| kept) {
            port.remove("nodePort");
        }
    }
}

pub async fn carry_over(
    store: &dyn Store,
    cidr: ServiceCidr,
    old: &Value,
    service: &mut Value,
) -> Result<(), ApiError> {
    let (name, _) = name_and_owner(service);
    let (_, owner) = name_and_owner(old);
    // A change of type to or from ExternalName: what it held goes, or it gets what a new
    // Service of its type gets (upstream's allocations on update).
    match (service_type(old) == "ExternalName", service_type(service) == "ExternalName") {
        (false, true) => {
            release(store, old).await;
            if let Some(spec) = service["spec"].as_object_mut() {
                for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                    spec.remove(field);
                }
            }
            if let Some(ports) = service["spec"]["ports"].as_array_mut() {
                for port in ports {
                    if let Some(port) = port.as_object_mut() {
                        port.remove("nodePort");
                    }
                }
            }
            return Ok(());
        }
        (true, false) => {
            allocate(store, cidr, service).await?;
            return Ok(());
        }
        (true, true) => return Ok(()),
        (false, false) => {}
    }
    for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
        match (&old["spec"][field], &service["spec"][field]) {
            (before, Value::Null) if !before.is_null() => service["spec"][field] = before.clone(),
            (before, now) if field == "clusterIP" && before != now && !before.is_null() => {
                return Err(invalid(&name, "spec.clusterIPs[0]", "Invalid value: field is immutable".into()));
            }
            _ => {}
        }
    }
    if needs_node_ports(service) {
        let old_ports = old["spec"]["ports"].as_array().cloned().unwrap_or_default();
        if let Some(ports) = service["spec"]["ports"].as_array_mut() {
            for port in ports.iter_mut() {
                if port["nodePort"].is_null()
                    && let Some(previous) =
                        old_ports.iter().find(|p| p["port"] == port["port"] && p["nodePort"].is_i64())
                {
                    port["nodePort"] = previous["nodePort"].clone();
                }
            }
        }
        let mut claims: Vec<String> = old_ports.iter().filter_map(|p| p["nodePort"].as_i64()).map(port_claim).collect();
        allocate_node_ports(store, service, &owner, &mut claims).await?;
    }
    Ok(())
}

/// Releases what a deleted Service held.
pub async fn release(store: &dyn Store, service: &Value) {
    let mut claims = Vec::new();
    if let Some(ip) = service["spec"]["clusterIP"].as_str().filter(|ip| *ip != "None" && !ip.is_empty()) {
        claims.push(ip_claim(ip));
    }
    for port in service["spec"]["ports"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        if let Some(node_port) = port["nodePort"].as_i64() {
            claims.push(port_claim(node_port));
        }
    }
    release_claims(store, &claims).await;
}

async fn release_claims(store: &dyn Store, claims: &[String]) {
    for key in claims {
        if let Err(error) = store.delete(key, None).await
            && !matches!(error, StoreError::NotFound { .. })
        {
            tracing::warn!(%error, key, "releasing a service allocation failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_bound_the_range() {
        let cidr: ServiceCidr = "10.96.0.0/16".parse().unwrap();
        assert_eq!(cidr.first(), Ipv4Addr::new(10, 96, 0, 1));
        assert!(cidr.contains(Ipv4Addr::new(10, 96, 255, 254)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 96, 255, 255)), "broadcast");
        assert!(!cidr.contains(Ipv4Addr::new(10, 97, 0, 1)));
        assert_eq!("10.0.0.7/24".parse::<ServiceCidr>().unwrap().to_string(), "10.0.0.0/24");
        assert!("10.0.0.0".parse::<ServiceCidr>().is_err());
        assert!("10.0.0.0/4".parse::<ServiceCidr>().is_err());
    }

    #[test]
    fn services_get_upstream_defaults_and_port_checks() {
        let mut service =
            json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}], "selector": {"app": "web"}}});
        default_and_validate(&mut service).unwrap();
        assert_eq!(service["spec"]["type"], "ClusterIP");
        assert_eq!(service["spec"]["ports"][0], json!({"port": 80, "protocol": "TCP", "targetPort": 80}));
        let mut two_unnamed = json!({"metadata": {"name": "x"}, "spec": {"ports": [{"port": 80}, {"port": 81}]}});
        assert_eq!(default_and_validate(&mut two_unnamed).unwrap_err().causes[0].field, "spec.ports[0].name");
        let mut no_ports = json!({"metadata": {"name": "x"}, "spec": {}});
        assert_eq!(default_and_validate(&mut no_ports).unwrap_err().causes[0].field, "spec.ports");
        let mut node_port_on_cluster_ip =
            json!({"metadata": {"name": "x"}, "spec": {"ports": [{"port": 80, "nodePort": 30001}]}});
        assert!(default_and_validate(&mut node_port_on_cluster_ip).is_err());
    }
}
