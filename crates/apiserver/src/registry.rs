//! The resources the server serves: group, version, kind, names, scope, verbs, and where their
//! objects live in the store.

use schemars::{JsonSchema, Schema, SchemaGenerator};

/// One served resource.
#[derive(Clone, Copy)]
pub struct Resource {
    /// API group; "" for the core group (served under `/api/v1`).
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// The URL segment: `pods`.
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// The store prefix segment, as kube-apiserver names it (`services/specs`, `minions`).
    pub storage: &'static str,
    /// Adds the OpenAPI schema of the kind to a generator's definitions and returns a
    /// reference to it.
    pub schema: fn(&mut SchemaGenerator) -> Schema,
    /// For a kind stored as another group's kind (events.k8s.io Events are core Events, as
    /// upstream stores them): the conversions to and from the stored form.
    pub conversion: Option<Conversion>,
    /// Decodes the kind's protobuf message (its k8s-rs-pb type) to that crate's serde form.
    pub protobuf: fn(&[u8]) -> Result<serde_json::Value, String>,
    /// For a resource a CustomResourceDefinition adds: what the definition says of it.
    pub custom: Option<&'static Custom>,
}

/// What a kind does on the write path beyond what every kind does (upstream's REST strategy
/// and the admission plugins of one kind): `strategy.rs` has what each one does; a resource's
/// is [`Resource::strategy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Nothing beyond the common path.
    Plain,
    /// A custom resource: its definition's schema (defaults, validation, CEL rules).
    Custom,
    Namespaces,
    Pods,
    Services,
    PersistentVolumes,
    PersistentVolumeClaims,
    /// ConfigMaps and Secrets: keyed data, immutable when they say so.
    KeyedData,
    NetworkPolicies,
    HorizontalPodAutoscalers,
    PriorityClasses,
    /// CustomResourceDefinitions.
    Definitions,
    /// Webhook configurations and policy bindings.
    AdmissionConfigurations,
    /// ValidatingAdmissionPolicies.
    Policies,
    ApiServices,
    CertificateSigningRequests,
    Deployments,
    /// API Priority and Fairness' FlowSchemas and PriorityLevelConfigurations.
    FlowControl,
}

/// A subresource as discovery lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subresource {
    pub name: &'static str,
    /// The kind it answers with: (group, version, kind).
    pub kind: (&'static str, &'static str, &'static str),
    pub verbs: &'static [&'static str],
}

/// Conversions between a kind and the kind it is stored as.
#[derive(Debug, Clone, Copy)]
pub struct Conversion {
    pub to_storage: fn(serde_json::Value) -> serde_json::Value,
    pub from_storage: fn(serde_json::Value) -> serde_json::Value,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.api_version(), self.plural)
    }
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.group == other.group && self.version == other.version && self.plural == other.plural
    }
}

impl Eq for Resource {}

pub(crate) fn schema_of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// The verbs every resource of this increment supports.
pub const VERBS: &[&str] = &["create", "delete", "get", "list", "patch", "update", "watch"];

macro_rules! resource {
    ($($type:ident)::+, $group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $namespaced:expr, $short:expr, $categories:expr) => {
        resource!($($type)::+, $group, $version, $kind, $plural, $singular, $namespaced, $short, $categories, $plural)
    };
    ($($type:ident)::+, $group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $namespaced:expr, $short:expr, $categories:expr, $storage:expr) => {
        resource!($($type)::+, $group, $version, $kind, $plural, $singular, $namespaced, $short, $categories, $storage, None)
    };
    ($($type:ident)::+, $group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $namespaced:expr, $short:expr, $categories:expr, $storage:expr, $conversion:expr) => {
        Resource {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $namespaced,
            short_names: $short,
            categories: $categories,
            storage: $storage,
            conversion: $conversion,
            schema: schema_of::<k8s_openapi::api::$($type)::+>,
            protobuf: to_serde_json::<k8s_rs_pb::api::$($type)::+>,
            custom: None,
        }
    };
}

const ALL: &[&str] = &["all"];
const NONE: &[&str] = &[];
const API_EXTENSIONS: &[&str] = &["api-extensions"];

/// Every served resource.
pub static RESOURCES: &[Resource] = &[
    resource!(core::v1::Namespace, "", "v1", "Namespace", "namespaces", "namespace", false, &["ns"], NONE),
    resource!(core::v1::Pod, "", "v1", "Pod", "pods", "pod", true, &["po"], ALL),
    resource!(core::v1::Service, "", "v1", "Service", "services", "service", true, &["svc"], ALL, "services/specs"),
    resource!(core::v1::ConfigMap, "", "v1", "ConfigMap", "configmaps", "configmap", true, &["cm"], NONE),
    resource!(core::v1::Secret, "", "v1", "Secret", "secrets", "secret", true, NONE, NONE),
    resource!(
        core::v1::ServiceAccount,
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        &["sa"],
        NONE
    ),
    resource!(
        core::v1::Endpoints,
        "",
        "v1",
        "Endpoints",
        "endpoints",
        "endpoints",
        true,
        &["ep"],
        NONE,
        "services/endpoints"
    ),
    resource!(core::v1::Event, "", "v1", "Event", "events", "event", true, &["ev"], NONE),
    resource!(
        events::v1::Event,
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        "event",
        true,
        &["ev"],
        NONE,
        "events",
        Some(Conversion { to_storage: crate::events::to_core, from_storage: crate::events::from_core })
    ),
    resource!(core::v1::Node, "", "v1", "Node", "nodes", "node", false, &["no"], NONE, "minions"),
    resource!(
        core::v1::PersistentVolume,
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        "persistentvolume",
        false,
        &["pv"],
        NONE
    ),
    resource!(
        core::v1::PersistentVolumeClaim,
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        true,
        &["pvc"],
        NONE
    ),
    resource!(core::v1::PodTemplate, "", "v1", "PodTemplate", "podtemplates", "podtemplate", true, NONE, NONE),
    resource!(
        core::v1::ReplicationController,
        "",
        "v1",
        "ReplicationController",
        "replicationcontrollers",
        "replicationcontroller",
        true,
        &["rc"],
        ALL,
        "controllers"
    ),
    resource!(core::v1::LimitRange, "", "v1", "LimitRange", "limitranges", "limitrange", true, &["limits"], NONE),
    resource!(
        core::v1::ResourceQuota,
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        "resourcequota",
        true,
        &["quota"],
        NONE
    ),
    resource!(apps::v1::Deployment, "apps", "v1", "Deployment", "deployments", "deployment", true, &["deploy"], ALL),
    resource!(apps::v1::ReplicaSet, "apps", "v1", "ReplicaSet", "replicasets", "replicaset", true, &["rs"], ALL),
    resource!(apps::v1::DaemonSet, "apps", "v1", "DaemonSet", "daemonsets", "daemonset", true, &["ds"], ALL),
    resource!(apps::v1::StatefulSet, "apps", "v1", "StatefulSet", "statefulsets", "statefulset", true, &["sts"], ALL),
    resource!(batch::v1::Job, "batch", "v1", "Job", "jobs", "job", true, NONE, ALL),
    resource!(batch::v1::CronJob, "batch", "v1", "CronJob", "cronjobs", "cronjob", true, &["cj"], ALL),
    resource!(
        apps::v1::ControllerRevision,
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        "controllerrevision",
        true,
        NONE,
        NONE
    ),
    resource!(
        autoscaling::v2::HorizontalPodAutoscaler,
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        &["hpa"],
        ALL
    ),
    resource!(
        autoscaling::v1::HorizontalPodAutoscaler,
        "autoscaling",
        "v1",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        &["hpa"],
        ALL,
        "horizontalpodautoscalers",
        Some(Conversion { to_storage: crate::autoscaling::to_v2, from_storage: crate::autoscaling::from_v2 })
    ),
    resource!(coordination::v1::Lease, "coordination.k8s.io", "v1", "Lease", "leases", "lease", true, NONE, NONE),
    resource!(
        networking::v1::Ingress,
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        "ingress",
        true,
        &["ing"],
        NONE
    ),
    resource!(
        networking::v1::IngressClass,
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        "ingressclass",
        false,
        NONE,
        NONE
    ),
    resource!(
        storage::v1::StorageClass,
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        "storageclass",
        false,
        &["sc"],
        NONE
    ),
    resource!(
        networking::v1::NetworkPolicy,
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        "networkpolicy",
        true,
        &["netpol"],
        NONE
    ),
    resource!(
        discovery::v1::EndpointSlice,
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        "endpointslice",
        true,
        NONE,
        NONE
    ),
    resource!(
        policy::v1::PodDisruptionBudget,
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        true,
        &["pdb"],
        NONE
    ),
    resource!(
        scheduling::v1::PriorityClass,
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        "priorityclass",
        false,
        &["pc"],
        NONE
    ),
    resource!(rbac::v1::Role, "rbac.authorization.k8s.io", "v1", "Role", "roles", "role", true, NONE, NONE),
    resource!(
        rbac::v1::RoleBinding,
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        "rolebinding",
        true,
        NONE,
        NONE
    ),
    resource!(
        rbac::v1::ClusterRole,
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        "clusterrole",
        false,
        NONE,
        NONE
    ),
    resource!(
        rbac::v1::ClusterRoleBinding,
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        false,
        NONE,
        NONE
    ),
    resource!(
        certificates::v1::CertificateSigningRequest,
        "certificates.k8s.io",
        "v1",
        "CertificateSigningRequest",
        "certificatesigningrequests",
        "certificatesigningrequest",
        false,
        &["csr"],
        NONE
    ),
    resource!(
        admissionregistration::v1::MutatingWebhookConfiguration,
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        "mutatingwebhookconfiguration",
        false,
        NONE,
        API_EXTENSIONS
    ),
    resource!(
        admissionregistration::v1::ValidatingWebhookConfiguration,
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
        "validatingwebhookconfiguration",
        false,
        NONE,
        API_EXTENSIONS
    ),
    resource!(
        admissionregistration::v1::ValidatingAdmissionPolicy,
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingAdmissionPolicy",
        "validatingadmissionpolicies",
        "validatingadmissionpolicy",
        false,
        NONE,
        API_EXTENSIONS
    ),
    resource!(
        admissionregistration::v1::ValidatingAdmissionPolicyBinding,
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingAdmissionPolicyBinding",
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicybinding",
        false,
        NONE,
        API_EXTENSIONS
    ),
    // Reviews: answered, never stored.
    resource!(
        authorization::v1::SelfSubjectAccessReview,
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        "",
        false,
        NONE,
        NONE,
        "-selfsubjectaccessreviews"
    ),
    resource!(
        authorization::v1::SubjectAccessReview,
        "authorization.k8s.io",
        "v1",
        "SubjectAccessReview",
        "subjectaccessreviews",
        "",
        false,
        NONE,
        NONE,
        "-subjectaccessreviews"
    ),
    resource!(
        authorization::v1::LocalSubjectAccessReview,
        "authorization.k8s.io",
        "v1",
        "LocalSubjectAccessReview",
        "localsubjectaccessreviews",
        "",
        true,
        NONE,
        NONE,
        "-localsubjectaccessreviews"
    ),
    resource!(
        authorization::v1::SelfSubjectRulesReview,
        "authorization.k8s.io",
        "v1",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        "",
        false,
        NONE,
        NONE,
        "-selfsubjectrulesreviews"
    ),
    resource!(
        authentication::v1::TokenReview,
        "authentication.k8s.io",
        "v1",
        "TokenReview",
        "tokenreviews",
        "",
        false,
        NONE,
        NONE,
        "-tokenreviews"
    ),
    resource!(
        flowcontrol::v1::FlowSchema,
        "flowcontrol.apiserver.k8s.io",
        "v1",
        "FlowSchema",
        "flowschemas",
        "flowschema",
        false,
        NONE,
        NONE
    ),
    resource!(
        flowcontrol::v1::PriorityLevelConfiguration,
        "flowcontrol.apiserver.k8s.io",
        "v1",
        "PriorityLevelConfiguration",
        "prioritylevelconfigurations",
        "prioritylevelconfiguration",
        false,
        NONE,
        NONE
    ),
    resource!(
        node::v1::RuntimeClass,
        "node.k8s.io",
        "v1",
        "RuntimeClass",
        "runtimeclasses",
        "runtimeclass",
        false,
        NONE,
        NONE
    ),
    resource!(
        storage::v1::CSIDriver,
        "storage.k8s.io",
        "v1",
        "CSIDriver",
        "csidrivers",
        "csidriver",
        false,
        NONE,
        NONE
    ),
    resource!(storage::v1::CSINode, "storage.k8s.io", "v1", "CSINode", "csinodes", "csinode", false, NONE, NONE),
    resource!(
        storage::v1::VolumeAttachment,
        "storage.k8s.io",
        "v1",
        "VolumeAttachment",
        "volumeattachments",
        "volumeattachment",
        false,
        NONE,
        NONE
    ),
    resource!(
        storage::v1::CSIStorageCapacity,
        "storage.k8s.io",
        "v1",
        "CSIStorageCapacity",
        "csistoragecapacities",
        "csistoragecapacity",
        true,
        NONE,
        NONE
    ),
    resource!(
        authentication::v1::SelfSubjectReview,
        "authentication.k8s.io",
        "v1",
        "SelfSubjectReview",
        "selfsubjectreviews",
        "",
        false,
        NONE,
        NONE,
        "-selfsubjectreviews"
    ),
    Resource {
        group: "apiextensions.k8s.io",
        version: "v1",
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        namespaced: false,
        short_names: &["crd", "crds"],
        categories: &["api-extensions"],
        storage: "apiextensions.k8s.io/customresourcedefinitions",
        schema: schema_of::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
        conversion: None,
        protobuf: to_serde_json::<
            k8s_rs_pb::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >,
        custom: None,
    },
    Resource {
        group: "apiregistration.k8s.io",
        version: "v1",
        kind: "APIService",
        plural: "apiservices",
        singular: "apiservice",
        namespaced: false,
        short_names: &[],
        categories: &["api-extensions"],
        storage: "apiregistration.k8s.io/apiservices",
        schema: schema_of::<k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService>,
        conversion: None,
        protobuf: to_serde_json::<k8s_rs_pb::kube_aggregator::pkg::apis::apiregistration::v1::APIService>,
        custom: None,
    },
];

impl Resource {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }

    /// The store prefix of every object of this resource (in `namespace`, if given).
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(namespace) if self.namespaced => {
                format!("/registry/{}/{namespace}/", self.storage)
            }
            _ => format!("/registry/{}/", self.storage),
        }
    }

    /// The store key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(namespace))
    }

    /// Reviews are created and answered, never stored.
    pub fn is_review(&self) -> bool {
        self.storage.starts_with('-')
    }

    /// The verbs discovery lists.
    pub fn verbs(&self) -> &'static [&'static str] {
        if self.is_review() { &["create"] } else { VERBS }
    }

    /// The plural by which the server's per-kind rules (defaults, validation, admission, the
    /// write path's special cases, Tables) know a built-in resource; empty for a custom one, so
    /// that a custom resource named like a built-in one (`pods` in `example.com`) meets none of
    /// them.
    pub fn builtin(&self) -> &'static str {
        if self.custom.is_some() { "" } else { self.plural }
    }

    /// Whether the resource has a `/status` subresource (and its main resource ignores status).
    pub fn has_status(&self) -> bool {
        if let Some(custom) = self.custom {
            return custom.status;
        }
        matches!(
            self.builtin(),
            "pods"
                | "nodes"
                | "namespaces"
                | "services"
                | "persistentvolumes"
                | "persistentvolumeclaims"
                | "resourcequotas"
                | "deployments"
                | "replicasets"
                | "replicationcontrollers"
                | "daemonsets"
                | "statefulsets"
                | "jobs"
                | "cronjobs"
                | "poddisruptionbudgets"
                | "certificatesigningrequests"
                | "horizontalpodautoscalers"
                | "volumeattachments"
                | "flowschemas"
                | "ingresses"
                | "prioritylevelconfigurations"
                | "customresourcedefinitions"
                | "validatingadmissionpolicies"
                | "apiservices"
        )
    }

    /// Whether the resource has a `/scale` subresource.
    pub fn has_scale(&self) -> bool {
        if let Some(custom) = self.custom {
            return custom.scale.is_some();
        }
        matches!(self.builtin(), "deployments" | "replicasets" | "replicationcontrollers" | "statefulsets")
    }

    /// Whether a create starts with an empty status, whatever the client sent (upstream's
    /// PrepareForCreate); nodes keep what the kubelet reports.
    pub fn clears_status_on_create(&self) -> bool {
        self.has_status() && !matches!(self.builtin(), "nodes" | "namespaces" | "pods")
    }

    /// The subresources discovery lists for this resource, as upstream's: (name, the kind it
    /// answers with as (group, version, kind), verbs).
    pub fn subresources(&self) -> Vec<Subresource> {
        let own = (self.group, self.version, self.kind);
        let mut list = Vec::new();
        if self.has_status() {
            list.push(Subresource { name: "status", kind: own, verbs: &["get", "patch", "update"] });
        }
        if self.has_scale() {
            list.push(Subresource {
                name: "scale",
                kind: ("autoscaling", "v1", "Scale"),
                verbs: &["get", "patch", "update"],
            });
        }
        if !self.group.is_empty() || self.custom.is_some() {
            if self.group == "certificates.k8s.io" && self.builtin() == "certificatesigningrequests" {
                list.push(Subresource { name: "approval", kind: own, verbs: &["get", "patch", "update"] });
            }
            return list;
        }
        const PROXY: &[&str] = &["create", "delete", "get", "patch", "update"];
        match self.builtin() {
            "serviceaccounts" => list.push(Subresource {
                name: "token",
                kind: ("authentication.k8s.io", "v1", "TokenRequest"),
                verbs: &["create"],
            }),
            "pods" => list.extend([
                Subresource { name: "attach", kind: ("", "v1", "PodAttachOptions"), verbs: &["create", "get"] },
                Subresource { name: "binding", kind: ("", "v1", "Binding"), verbs: &["create"] },
                Subresource { name: "ephemeralcontainers", kind: own, verbs: &["get", "patch", "update"] },
                Subresource { name: "eviction", kind: ("policy", "v1", "Eviction"), verbs: &["create"] },
                Subresource { name: "exec", kind: ("", "v1", "PodExecOptions"), verbs: &["create", "get"] },
                Subresource { name: "log", kind: own, verbs: &["get"] },
                Subresource {
                    name: "portforward",
                    kind: ("", "v1", "PodPortForwardOptions"),
                    verbs: &["create", "get"],
                },
                Subresource { name: "proxy", kind: ("", "v1", "PodProxyOptions"), verbs: PROXY },
            ]),
            "services" => {
                list.push(Subresource { name: "proxy", kind: ("", "v1", "ServiceProxyOptions"), verbs: PROXY })
            }
            "nodes" => list.push(Subresource { name: "proxy", kind: ("", "v1", "NodeProxyOptions"), verbs: PROXY }),
            "namespaces" => list.push(Subresource { name: "finalize", kind: own, verbs: &["update"] }),
            _ => {}
        }
        list
    }

    /// How objects of this resource are written beyond what every kind does.
    pub fn strategy(&self) -> Strategy {
        if self.custom.is_some() {
            return Strategy::Custom;
        }
        match (self.group, self.plural) {
            ("", "namespaces") => Strategy::Namespaces,
            ("", "pods") => Strategy::Pods,
            ("", "services") => Strategy::Services,
            ("", "persistentvolumes") => Strategy::PersistentVolumes,
            ("", "persistentvolumeclaims") => Strategy::PersistentVolumeClaims,
            ("", "configmaps" | "secrets") => Strategy::KeyedData,
            ("networking.k8s.io", "networkpolicies") => Strategy::NetworkPolicies,
            ("autoscaling", "horizontalpodautoscalers") => Strategy::HorizontalPodAutoscalers,
            ("scheduling.k8s.io", "priorityclasses") => Strategy::PriorityClasses,
            ("apiextensions.k8s.io", "customresourcedefinitions") => Strategy::Definitions,
            ("admissionregistration.k8s.io", "validatingadmissionpolicies") => Strategy::Policies,
            ("admissionregistration.k8s.io", _) => Strategy::AdmissionConfigurations,
            ("apiregistration.k8s.io", _) => Strategy::ApiServices,
            ("certificates.k8s.io", "certificatesigningrequests") => Strategy::CertificateSigningRequests,
            ("apps", "deployments") => Strategy::Deployments,
            ("flowcontrol.apiserver.k8s.io", _) => Strategy::FlowControl,
            _ => Strategy::Plain,
        }
    }

    /// Whether objects of this kind carry `metadata.generation` (bumped on spec changes).
    pub fn has_generation(&self) -> bool {
        self.custom.is_some()
            || !self.group.is_empty()
                && !matches!(self.group, "coordination.k8s.io" | "rbac.authorization.k8s.io" | "events.k8s.io")
            || matches!(self.builtin(), "pods" | "replicationcontrollers")
    }
}

/// Finds a resource by group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// What a definition says of one served version of its resource.
#[derive(Debug, PartialEq)]
pub struct Custom {
    /// The definition's name (`<plural>.<group>`).
    pub crd: String,
    /// The version objects are stored in.
    pub storage_version: String,
    /// `openAPIV3Schema`, when the version has one.
    pub schema: Option<CustomSchema>,
    /// `additionalPrinterColumns`.
    pub columns: Vec<PrinterColumn>,
    /// Whether the `/status` subresource is enabled.
    pub status: bool,
    /// The `/scale` subresource's paths, when enabled.
    pub scale: Option<ScalePaths>,
    pub list_kind: String,
    /// The definition is being deleted: its objects may be read and deleted, not created.
    pub terminating: bool,
    /// `spec.conversion.webhook` (`clientConfig`, `conversionReviewVersions`) when a webhook
    /// converts between versions.
    pub webhook: Option<serde_json::Value>,
    /// The version's `selectableFields`, as field selectors name them (`spec.color`).
    pub selectable: Vec<String>,
    /// A digest of what the definition says of the version (names, scope, schema…): it changes
    /// when the published OpenAPI document of the resource does.
    pub digest: u64,
}

/// A custom version's `openAPIV3Schema`, kept as its JSON text and decoded when used: decoded
/// (`serde_json::Value`), a schema takes ~12 times its text, and a cluster may have a thousand
/// definitions. The [`DECODED_KEPT`] most recently used ones stay decoded.
#[derive(Debug)]
pub struct CustomSchema {
    id: u64,
    text: Box<str>,
}

/// How many schemas stay decoded (those of the custom kinds in use).
const DECODED_KEPT: usize = 64;

impl CustomSchema {
    pub fn new(schema: &serde_json::Value) -> CustomSchema {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        CustomSchema { id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed), text: schema.to_string().into() }
    }

    /// The schema, decoded.
    pub fn decoded(&self) -> std::sync::Arc<serde_json::Value> {
        use std::sync::{Arc, Mutex};
        /// Most recently used first.
        static DECODED: Mutex<Vec<(u64, Arc<serde_json::Value>)>> = Mutex::new(Vec::new());
        {
            let mut decoded = DECODED.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = decoded.iter().position(|(id, _)| *id == self.id) {
                let found = decoded.remove(at);
                let schema = found.1.clone();
                decoded.insert(0, found);
                return schema;
            }
        }
        // The text was written from a Value, so it reads back as one.
        let schema: Arc<serde_json::Value> = Arc::new(serde_json::from_str(&self.text).unwrap_or_default());
        let mut decoded = DECODED.lock().unwrap_or_else(|e| e.into_inner());
        if !decoded.iter().any(|(id, _)| *id == self.id) {
            decoded.insert(0, (self.id, schema.clone()));
            decoded.truncate(DECODED_KEPT);
        }
        schema
    }
}

impl PartialEq for CustomSchema {
    fn eq(&self, other: &CustomSchema) -> bool {
        self.text == other.text
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub kind: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    pub label_selector: Option<String>,
}

/// Decodes `raw` as a `T` and serializes it (in k8s-rs-pb's serde form, fixed up by `decode`).
pub fn to_serde_json<T: protobuf::Message + serde::Serialize>(raw: &[u8]) -> Result<serde_json::Value, String> {
    let message = T::parse_from_bytes(raw).map_err(|e| e.to_string())?;
    serde_json::to_value(&message).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_kube_apiserver_layout() {
        let pods = find("", "v1", "pods").unwrap();
        assert_eq!(pods.key(Some("default"), "web"), "/registry/pods/default/web");
        let services = find("", "v1", "services").unwrap();
        assert_eq!(services.key(Some("default"), "db"), "/registry/services/specs/default/db");
        let nodes = find("", "v1", "nodes").unwrap();
        assert_eq!(nodes.key(None, "n1"), "/registry/minions/n1");
        assert_eq!(find("apps", "v1", "deployments").unwrap().api_version(), "apps/v1");
    }

    #[test]
    fn a_schema_decodes_to_what_it_was_made_from_while_others_come_and_go() {
        let first = serde_json::json!({"type": "object", "properties": {"spec": {"type": "integer", "default": 3}}});
        let schema = CustomSchema::new(&first);
        assert_eq!(*schema.decoded(), first);
        let others: Vec<CustomSchema> =
            (0..2 * DECODED_KEPT).map(|i| CustomSchema::new(&serde_json::json!({"type": "object", "x": i}))).collect();
        for (i, other) in others.iter().enumerate() {
            assert_eq!(other.decoded()["x"], i);
        }
        // Pushed out of the decoded ones by the others, and decoded again.
        assert_eq!(*schema.decoded(), first);
        assert!(std::sync::Arc::ptr_eq(&schema.decoded(), &schema.decoded()));
    }

    #[test]
    fn plurals_are_unique_per_group() {
        for (i, a) in RESOURCES.iter().enumerate() {
            for b in &RESOURCES[i + 1..] {
                assert!(!(a.group == b.group && a.version == b.version && a.plural == b.plural), "{} twice", a.plural);
                if a.conversion.is_none() && b.conversion.is_none() {
                    assert_ne!(a.storage, b.storage, "two resources share a store prefix");
                }
            }
        }
    }
}
