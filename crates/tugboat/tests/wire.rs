//! Wire details that upstream's conformance suite and other clients' own suites check, each
//! against a real `tugboat server` with the real kubectl or raw HTTP as those clients send it.

use std::path::Path;

use serde_json::Value;
use tugboat_testkit::{TugboatServer, eventually};

fn server() -> TugboatServer {
    TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts")
}

/// A protobuf field: its key, then the varint or the length-delimited bytes.
fn varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}
fn bytes_field(number: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(number << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}
fn int_field(number: u64, value: u64, out: &mut Vec<u8>) {
    varint(number << 3, out);
    varint(value, out);
}

/// A body as client-go sends it for `application/vnd.kubernetes.protobuf`: the `k8s\0` magic,
/// then a runtime.Unknown with the type (apiVersion, kind) and the message.
fn envelope(api_version: &str, kind: &str, message: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::new();
    bytes_field(1, api_version.as_bytes(), &mut type_meta);
    bytes_field(2, kind.as_bytes(), &mut type_meta);
    let mut unknown = Vec::new();
    bytes_field(1, &type_meta, &mut unknown);
    bytes_field(2, message, &mut unknown);
    [&b"k8s\0"[..], &unknown].concat()
}

/// meta.v1.DeleteOptions{gracePeriodSeconds (1), propagationPolicy (4)}.
fn delete_options(grace: Option<u64>, propagation: &str) -> Vec<u8> {
    let mut message = Vec::new();
    if let Some(grace) = grace {
        int_field(1, grace, &mut message);
    }
    bytes_field(4, propagation.as_bytes(), &mut message);
    message
}

/// Sends `body` (protobuf) with `method` to `path`; returns (code, response).
fn protobuf(server: &TugboatServer, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let file = server.scratch("bodies").join(format!("{}.pb", body.len()));
    std::fs::write(&file, body).unwrap();
    let data = format!("@{}", file.display());
    let headers = ["-H", "Content-Type: application/vnd.kubernetes.protobuf", "-H", "Accept: application/json"];
    server.curl(method, path, true, &[&headers[..], &["--data-binary", &data]].concat())
}

#[test]
fn protobuf_bodies_on_deletes_and_subresources() {
    let server = server();
    let kubectl = |args: &[&str]| server.kubectl(args, None);
    kubectl(&["create", "namespace", "e2e-1"]);
    for name in ["a", "b", "c"] {
        kubectl(&["create", "configmap", name, "-n", "e2e-1", "--from-literal=k=v"]);
    }
    kubectl(&["label", "configmap", "b", "c", "-n", "e2e-1", "sweep=yes"]);

    // DELETE with DeleteOptions in protobuf, as client-go's typed clients send it (here in
    // the core group's version, "v1").
    let (code, body) = protobuf(
        &server,
        "DELETE",
        "/api/v1/namespaces/e2e-1/configmaps/a",
        &envelope("v1", "DeleteOptions", &delete_options(Some(0), "Background")),
    );
    assert_eq!(code, 200, "{body}");
    // deletecollection, with a selector.
    let (code, body) = protobuf(
        &server,
        "DELETE",
        "/api/v1/namespaces/e2e-1/configmaps?labelSelector=sweep%3Dyes",
        &envelope("v1", "DeleteOptions", &delete_options(None, "Background")),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(kubectl(&["get", "configmaps", "-n", "e2e-1", "-o", "name"]).trim(), "configmap/kube-root-ca.crt");

    // A Scale update in protobuf (autoscaling/v1): spec.replicas (field 2 → 1).
    kubectl(&["create", "deployment", "web", "-n", "e2e-1", "--image=nginx", "--replicas=1"]);
    let mut meta = Vec::new();
    bytes_field(1, b"web", &mut meta);
    bytes_field(3, b"e2e-1", &mut meta);
    let mut spec = Vec::new();
    int_field(1, 3, &mut spec);
    let mut scale = Vec::new();
    bytes_field(1, &meta, &mut scale);
    bytes_field(2, &spec, &mut scale);
    let (code, body) = protobuf(
        &server,
        "PUT",
        "/apis/apps/v1/namespaces/e2e-1/deployments/web/scale",
        &envelope("autoscaling/v1", "Scale", &scale),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(kubectl(&["get", "deployment", "web", "-n", "e2e-1", "-o", "jsonpath={.spec.replicas}"]), "3");

    // The e2e framework's cleanup: the test namespace, deleted by a protobuf client.
    let (code, body) = protobuf(
        &server,
        "DELETE",
        "/api/v1/namespaces/e2e-1",
        &envelope("v1", "DeleteOptions", &delete_options(None, "Background")),
    );
    assert_eq!(code, 200, "{body}");
    let namespace: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(namespace["status"]["phase"], "Terminating", "{body}");

    // DeleteOptions in the query, as a REST client may send them: the grace period asked for
    // holds a bound pod for its kubelet even when its spec says 0, and `orphanDependents`
    // stands for the Orphan policy.
    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"default"},
        "spec":{"nodeName":"elsewhere","terminationGracePeriodSeconds":0,"containers":[{"name":"c","image":"pause"}]}}"#;
    server.kubectl(&["create", "-f", "-"], Some(pod));
    let (code, body) = server.curl("DELETE", "/api/v1/namespaces/default/pods/p?gracePeriodSeconds=30", true, &[]);
    assert_eq!(code, 200, "{body}");
    let pod: Value = serde_json::from_str(&body).unwrap();
    assert!(pod["metadata"]["deletionTimestamp"].is_string(), "{body}");
    assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 30, "{body}");
    kubectl(&["create", "configmap", "kept", "--from-literal=k=v"]);
    let (code, body) =
        server.curl("DELETE", "/api/v1/namespaces/default/configmaps/kept?orphanDependents=true", true, &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""finalizers":["orphan"]"#), "{body}");
    let (code, body) = server.curl("DELETE", "/api/v1/namespaces/default/pods/p?gracePeriodSeconds=soon", true, &[]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("gracePeriodSeconds"), "{body}");

    // A malformed protobuf DeleteOptions is a 400 with a Status, and the server carries on.
    let (code, body) = protobuf(&server, "DELETE", "/api/v1/namespaces/default/configmaps/x", b"k8s\0\x0a\xff");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"kind\":\"Status\""), "{body}");
}

#[test]
fn selectable_fields_services_and_shared_apply_ownership() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);

    // Nodes that never set spec.unschedulable are schedulable (the suite's first request).
    for name in ["n1", "n2"] {
        let node = format!(r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{name}"}}}}"#);
        kubectl(&["create", "-f", "-"], Some(&node));
    }
    kubectl(&["cordon", "n2"], None);
    let schedulable = kubectl(&["get", "nodes", "--field-selector", "spec.unschedulable=false", "-o", "name"], None);
    assert_eq!(schedulable.trim(), "node/n1");
    let cordoned = kubectl(&["get", "nodes", "--field-selector", "spec.unschedulable=true", "-o", "name"], None);
    assert_eq!(cordoned.trim(), "node/n2");
    // Pods' selectable fields with their defaults, and a field no kind has.
    let pod = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c","image":"busybox"}]}}"#;
    kubectl(&["create", "-f", "-"], Some(pod));
    let host = kubectl(&["get", "pods", "--field-selector", "spec.hostNetwork=false", "-o", "name"], None);
    assert_eq!(host.trim(), "pod/p");
    let (code, body) = server.curl("GET", "/api/v1/pods?fieldSelector=spec.nonsense%3Dx", true, &[]);
    assert!(code == 400 && body.contains("field label not supported: spec.nonsense"), "{code} {body}");

    // A Service created with a JSON body comes back with status.loadBalancer, as upstream's.
    let service = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"s"},"spec":{"ports":[{"port":80}]}}"#;
    let (code, body) = server.curl(
        "POST",
        "/api/v1/namespaces/default/services",
        true,
        &["-H", "Content-Type: application/json", "-d", service],
    );
    assert_eq!(code, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(created["status"], serde_json::json!({"loadBalancer": {}}), "{body}");
    let listed = kubectl(&["get", "service", "s", "-o", "jsonpath={.status}"], None);
    assert_eq!(listed, r#"{"loadBalancer":{}}"#);

    // `kubectl create -f` then `kubectl apply --server-side -f` of the same file: the two
    // managers share the fields, no conflict, nothing doubled.
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nginx\n  labels: {app: nginx}\nspec:\n  \
                      replicas: 3\n  selector:\n    matchLabels: {app: nginx}\n  template:\n    metadata:\n      labels: \
                      {app: nginx}\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.14.2\n        \
                      ports:\n        - containerPort: 80\n";
    kubectl(&["create", "-f", "-"], Some(deployment));
    kubectl(&["apply", "--server-side", "-f", "-"], Some(deployment));
    let containers = kubectl(&["get", "deployment", "nginx", "-o", "jsonpath={.spec.template.spec.containers}"], None);
    let containers: Value = serde_json::from_str(&containers).unwrap();
    assert_eq!(containers.as_array().unwrap().len(), 1, "{containers}");
    assert_eq!(containers[0]["ports"], serde_json::json!([{"containerPort": 80, "protocol": "TCP"}]));
    let managers = kubectl(
        &["get", "deployment", "nginx", "--show-managed-fields", "-o", "jsonpath={.metadata.managedFields[*].manager}"],
        None,
    );
    assert!(managers.contains("kubectl-create") && managers.contains("kubectl"), "{managers}");
    // A changed value owned by another manager still conflicts.
    let changed = deployment.replace("nginx:1.14.2", "nginx:1.16.0");
    let out = std::process::Command::new("/usr/bin/kubectl")
        .args(["apply", "--server-side", "--field-manager=other", "-f"])
        .arg({
            let file = server.scratch("manifests").join("changed.yaml");
            std::fs::write(&file, changed).unwrap();
            file
        })
        .env("KUBECONFIG", server.kubeconfig())
        .env("HOME", server.scratch("home"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("conflict"), "{said}");
}

#[test]
fn pod_templates_and_replication_controllers_are_served() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    let template = "apiVersion: v1\nkind: PodTemplate\nmetadata:\n  name: t\ntemplate:\n  metadata:\n    labels: \
                    {app: t}\n  spec:\n    containers:\n    - name: c\n      image: busybox\n";
    kubectl(&["create", "-f", "-"], Some(template));
    // Defaulted as a pod spec is.
    let policy = kubectl(&["get", "podtemplate", "t", "-o", "jsonpath={.template.spec.restartPolicy}"], None);
    assert_eq!(policy, "Always");
    assert!(kubectl(&["get", "podtemplates"], None).contains("t"));

    // A ReplicationController: the selector and labels default to the template's, its pods
    // are made and owned, `kubectl scale` and the columns work, and its pods go with it.
    let rc = "apiVersion: v1\nkind: ReplicationController\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  template:\n    \
              metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: c\n        image: busybox\n";
    kubectl(&["create", "-f", "-"], Some(rc));
    let selector = kubectl(&["get", "rc", "web", "-o", "jsonpath={.spec.selector.app}/{.metadata.labels.app}"], None);
    assert_eq!(selector, "web/web");
    let owned = || {
        let pods = kubectl(
            &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].metadata.ownerReferences[0].kind}"],
            None,
        );
        pods.split_whitespace().filter(|k| *k == "ReplicationController").count()
    };
    eventually("2 pods of the ReplicationController", || owned() == 2);
    kubectl(&["scale", "rc", "web", "--replicas=3"], None);
    eventually("3 pods of the ReplicationController", || owned() == 3);
    eventually("the status to count them", || {
        kubectl(&["get", "rc", "web", "-o", "jsonpath={.status.replicas}"], None) == "3"
    });
    let table = kubectl(&["get", "rc", "web"], None);
    assert!(table.starts_with("NAME") && table.contains("DESIRED") && table.contains("CURRENT"), "{table}");
    assert!(kubectl(&["describe", "rc", "web"], None).contains("Created pod: web-"));
    kubectl(&["delete", "rc", "web"], None);
    eventually("the pods to go with their controller", || owned() == 0);
}

#[test]
fn token_reviews_runtime_classes_and_csi_objects_are_served() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    // TokenReview: a service account's token is who it says; a made-up one is not.
    kubectl(&["create", "serviceaccount", "reviewer"], None);
    let token = kubectl(&["create", "token", "reviewer"], None);
    let review = |token: &str| {
        let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                      "spec": {"token": token}})
        .to_string();
        let (code, answer) = server.curl(
            "POST",
            "/apis/authentication.k8s.io/v1/tokenreviews",
            true,
            &["-H", "Content-Type: application/json", "-d", &body],
        );
        assert_eq!(code, 201, "{answer}");
        serde_json::from_str::<Value>(&answer).unwrap()["status"].clone()
    };
    let status = review(token.trim());
    assert_eq!(status["authenticated"], true, "{status}");
    assert_eq!(status["user"]["username"], "system:serviceaccount:default:reviewer", "{status}");
    let jti = status["user"]["extra"]["authentication.kubernetes.io/credential-id"].clone();
    assert!(jti.as_array().is_some_and(|v| v.len() == 1 && v[0].as_str().unwrap().starts_with("JTI=")), "{status}");
    // A pod-bound token says its pod and the pod's node (as upstream's authenticator does).
    let objects = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n---\napiVersion: v1\nkind: Pod\n\
                   metadata: {name: bound}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: busybox}]\n";
    kubectl(&["apply", "-f", "-"], Some(objects));
    let token = kubectl(&["create", "token", "reviewer", "--bound-object-kind=Pod", "--bound-object-name=bound"], None);
    let extra = review(token.trim())["user"]["extra"].clone();
    let one =
        |key: &str| extra[format!("authentication.kubernetes.io/{key}")][0].as_str().unwrap_or_default().to_string();
    assert_eq!(one("pod-name"), "bound", "{extra}");
    assert_eq!(one("pod-uid"), kubectl(&["get", "pod", "bound", "-o", "jsonpath={.metadata.uid}"], None), "{extra}");
    assert_eq!(one("node-name"), "n1", "{extra}");
    assert_eq!(one("node-uid"), kubectl(&["get", "node", "n1", "-o", "jsonpath={.metadata.uid}"], None), "{extra}");
    assert!(one("credential-id").starts_with("JTI="), "{extra}");
    let status = review("not-a-token");
    assert!(status["authenticated"].is_null() && status["error"].is_string(), "{status}");
    // Impersonating a uid and extras (the admin may): SelfSubjectReview shows them.
    let whoami = kubectl(
        &["auth", "whoami", "--as=system:serviceaccount:default:reviewer", "--as-uid=1234", "-o", "json"],
        None,
    );
    let whoami: Value = serde_json::from_str(&whoami).unwrap();
    assert_eq!(whoami["status"]["userInfo"]["uid"], "1234", "{whoami}");
    let (code, whoami) = server.curl(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        true,
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "Impersonate-User: jane",
            "-H",
            "Impersonate-Extra-Team%2Fname: blue",
            "-d",
            r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#,
        ],
    );
    assert_eq!(code, 201, "{whoami}");
    let whoami: Value = serde_json::from_str(&whoami).unwrap();
    assert_eq!(whoami["status"]["userInfo"]["extra"]["team/name"][0], "blue", "{whoami}");
    // Service account issuer discovery: every service account may read the issuer's OpenID
    // configuration and keys.
    let as_account = ["--as=system:serviceaccount:default:reviewer", "--as-group=system:serviceaccounts"];
    let configuration =
        kubectl(&["get", "--raw", "/.well-known/openid-configuration", as_account[0], as_account[1]], None);
    let configuration: Value = serde_json::from_str(&configuration).unwrap();
    assert_eq!(configuration["issuer"], "https://kubernetes.default.svc.cluster.local", "{configuration}");
    let keys = kubectl(&["get", "--raw", "/openid/v1/jwks", as_account[0], as_account[1]], None);
    let keys: Value = serde_json::from_str(&keys).unwrap();
    assert_eq!(keys["keys"][0]["kty"], "EC", "{keys}");
    // Subresources are discovered as upstream lists them.
    let certificates = kubectl(&["get", "--raw", "/apis/certificates.k8s.io/v1"], None);
    assert!(certificates.contains(r#""name":"certificatesigningrequests/approval""#), "{certificates}");
    let core = kubectl(&["get", "--raw", "/api/v1"], None);
    for name in ["services/proxy", "nodes/proxy", "namespaces/finalize", "pods/exec"] {
        assert!(core.contains(&format!(r#""name":"{name}""#)), "{name}");
    }
    // LocalSubjectAccessReview: a SubjectAccessReview within its own namespace.
    let local = |namespace: &str| {
        format!(
            "apiVersion: authorization.k8s.io/v1\nkind: LocalSubjectAccessReview\nmetadata: {{namespace: default}}\n\
             spec:\n  user: system:serviceaccount:default:reviewer\n  \
             resourceAttributes: {{verb: list, resource: configmaps, namespace: {namespace}}}\n"
        )
    };
    let answer = kubectl(&["create", "-f", "-", "-o", "json"], Some(&local("default")));
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (answer["kind"].as_str(), answer["status"]["allowed"].as_bool()),
        (Some("LocalSubjectAccessReview"), Some(false)),
        "{answer}"
    );
    kubectl(
        &["create", "rolebinding", "reviewer-view", "--clusterrole=view", "--serviceaccount=default:reviewer"],
        None,
    );
    let answer = kubectl(&["create", "-f", "-", "-o", "jsonpath={.status.allowed}"], Some(&local("default")));
    assert_eq!(answer, "true");
    let error = server.kubectl_fails(&["create", "-f", "-"], Some(&local("kube-system")));
    assert!(
        error.contains(
            "spec.resourceAttributes.namespace: Invalid value: \"kube-system\": must match metadata.namespace"
        ),
        "{error}"
    );
    // A review has no metadata for a Table: a client that accepts only Tables gets 406.
    let sar = r#"{"kind":"SelfSubjectAccessReview","apiVersion":"authorization.k8s.io/v1","spec":{"nonResourceAttributes":{"path":"/","verb":"get"}}}"#;
    let (code, body) = server.curl(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        true,
        &[
            "-H",
            "Content-Type: application/json",
            "-H",
            "Accept: application/json;as=Table;v=v1;g=meta.k8s.io",
            "-d",
            sar,
        ],
    );
    assert!(code == 406 && body.contains("NotAcceptable"), "{code} {body}");

    // Kinds that are only stored, for the components that act on them.
    let objects = "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: gvisor}\nhandler: runsc\n---\n\
                   apiVersion: storage.k8s.io/v1\nkind: CSIDriver\nmetadata: {name: hostpath.csi.k8s.io}\nspec: {}\n---\n\
                   apiVersion: storage.k8s.io/v1\nkind: VolumeAttachment\nmetadata: {name: va}\nspec:\n  attacher: \
                   hostpath.csi.k8s.io\n  nodeName: n1\n  source: {persistentVolumeName: pv1}\n";
    kubectl(&["apply", "-f", "-"], Some(objects));
    assert_eq!(kubectl(&["get", "runtimeclass", "gvisor", "-o", "jsonpath={.handler}"], None), "runsc");
    assert!(kubectl(&["get", "csidrivers"], None).contains("hostpath.csi.k8s.io"));
    assert_eq!(kubectl(&["get", "volumeattachment", "va", "-o", "jsonpath={.spec.nodeName}"], None), "n1");
    let resources = kubectl(&["api-resources", "-o", "name"], None);
    for name in ["csinodes.storage.k8s.io", "csistoragecapacities.storage.k8s.io", "tokenreviews.authentication.k8s.io"]
    {
        assert!(resources.contains(name), "{name}: {resources}");
    }
    // API Priority and Fairness objects, with their status subresources (the conformance
    // suite's CRUD; nothing acts on them yet).
    let schema = "apiVersion: flowcontrol.apiserver.k8s.io/v1\nkind: FlowSchema\nmetadata: {name: fs}\nspec:\n  \
                  matchingPrecedence: 1000\n  priorityLevelConfiguration: {name: global-default}\n";
    kubectl(&["apply", "-f", "-"], Some(schema));
    assert_eq!(kubectl(&["get", "flowschema", "fs", "-o", "jsonpath={.spec.matchingPrecedence}"], None), "1000");
    let group = kubectl(&["get", "--raw", "/apis/flowcontrol.apiserver.k8s.io/v1"], None);
    assert!(group.contains("flowschemas/status") && group.contains("prioritylevelconfigurations/status"), "{group}");
}

#[test]
fn quota_admission_refuses_what_would_exceed_and_charges_at_once() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "namespace", "a"], None);
    kubectl(&["create", "quota", "small", "-n", "a", "--hard=services=2,services.nodeports=1,cpu=1,pods=3"], None);
    let used = |key: &str| {
        let path = format!("jsonpath={{.status.used.{}}}", key.replace('.', "\\."));
        kubectl(&["get", "quota", "small", "-n", "a", "-o", &path], None)
    };
    eventually("the quota's first status", || used("services") == "0");
    // Back to back, before the controller could recount: the first is charged at once.
    kubectl(&["create", "service", "nodeport", "n", "-n", "a", "--tcp=80"], None);
    let refused = server.kubectl_fails(&["create", "service", "nodeport", "m", "-n", "a", "--tcp=81"], None);
    assert!(
        refused.contains(
            "services \"m\" is forbidden: exceeded quota: small, requested: services.nodeports=1, used: services.nodeports=1, limited: services.nodeports=1"
        ),
        "{refused}"
    );
    assert_eq!(used("services.nodeports"), "1");
    kubectl(&["create", "service", "clusterip", "c", "-n", "a", "--tcp=80"], None);
    let third = server.kubectl_fails(&["create", "service", "clusterip", "d", "-n", "a", "--tcp=80"], None);
    assert!(
        third.contains("exceeded quota: small, requested: services=1, used: services=2, limited: services=2"),
        "{third}"
    );
    // A pod that names no CPU when the quota limits it; one that asks for too much.
    let pod = |name: &str, resources: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: a}}\nspec:\n  containers:\n  - name: c\n    \
             image: busybox\n    resources: {resources}\n"
        )
    };
    let bare = server.kubectl_fails(&["apply", "-f", "-"], Some(&pod("bare", "{}")));
    assert!(bare.contains("is forbidden: failed quota: small: must specify cpu for: c"), "{bare}");
    kubectl(&["apply", "-f", "-"], Some(&pod("fits", "{requests: {cpu: 600m}}")));
    let greedy = server.kubectl_fails(&["apply", "-f", "-"], Some(&pod("greedy", "{limits: {cpu: 500m}}")));
    assert!(greedy.contains("requested: cpu=500m, used: cpu=600m, limited: cpu=1"), "{greedy}");
    // A dry run checks without charging; deleting frees the quota once the controller recounts.
    kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&pod("dry", "{requests: {cpu: 400m}}")));
    assert_eq!(used("cpu"), "600m");
    kubectl(&["delete", "pod", "fits", "-n", "a", "--grace-period=0", "--force"], None);
    eventually("the pod's CPU released", || used("cpu") == "0");
    kubectl(&["apply", "-f", "-"], Some(&pod("greedy", "{limits: {cpu: 500m}}")));
}

#[test]
fn resource_quotas_count_what_their_namespace_uses() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "namespace", "q"], None);
    kubectl(
        &[
            "create",
            "quota",
            "compute",
            "-n",
            "q",
            "--hard=pods=5,cpu=1,memory=1Gi,configmaps=10,services=3,count/deployments.apps=2",
        ],
        None,
    );
    let used = |key: &str| {
        let path = format!("jsonpath={{.status.used.{}}}", key.replace('.', "\\."));
        kubectl(&["get", "quota", "compute", "-n", "q", "-o", &path], None)
    };
    // The namespace's kube-root-ca.crt is counted like any ConfigMap.
    eventually("the quota's first status", || used("pods") == "0" && used("configmaps") == "1");
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: q}\nspec:\n  containers:\n  - name: c\n    \
               image: busybox\n    resources: {requests: {cpu: 500m, memory: 252Mi}}\n";
    kubectl(&["apply", "-f", "-"], Some(pod));
    kubectl(&["create", "service", "clusterip", "s", "-n", "q", "--tcp=80"], None);
    kubectl(&["create", "deployment", "d", "-n", "q", "--image=busybox", "--replicas=0"], None);
    eventually("the pod, service and deployment counted", || {
        used("pods") == "1"
            && used("cpu") == "500m"
            && used("memory") == "252Mi"
            && used("services") == "1"
            && used("count/deployments.apps") == "1"
    });
    assert_eq!(
        kubectl(&["get", "quota", "compute", "-n", "q", "-o", "jsonpath={.status.hard.cpu}"], None),
        "1",
        "status.hard is the spec's"
    );
    let described = kubectl(&["describe", "quota", "compute", "-n", "q"], None);
    assert!(described.contains("Used") && described.contains("500m"), "{described}");
    // Gone, and no longer counted; a key dropped from the spec leaves the status.
    kubectl(&["delete", "pod", "p", "-n", "q", "--grace-period=0", "--force"], None);
    kubectl(
        &[
            "patch",
            "quota",
            "compute",
            "-n",
            "q",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/hard/services"}]"#,
        ],
        None,
    );
    eventually("the pod released and services dropped", || {
        used("pods") == "0" && used("cpu") == "0" && used("services").is_empty()
    });
}

#[test]
fn a_pods_spec_changes_only_where_upstream_lets_it() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  activeDeadlineSeconds: 600\n  containers:\n  \
               - name: c\n    image: busybox:1.35\n    resources: {requests: {cpu: 100m}}\n";
    kubectl(&["apply", "-f", "-"], Some(pod));
    // What may change: the image, a lower deadline, added tolerations, labels.
    kubectl(&["set", "image", "pod/p", "c=busybox:1.36"], None);
    let allowed = r#"{"spec":{"activeDeadlineSeconds":300},"metadata":{"labels":{"a":"b"}}}"#;
    kubectl(&["patch", "pod", "p", "--type=merge", "-p", allowed], None);
    let toleration = r#"[{"op":"add","path":"/spec/tolerations/-","value":{"key":"k","operator":"Exists"}}]"#;
    kubectl(&["patch", "pod", "p", "--type=json", "-p", toleration], None);
    // Replacing the list drops the tolerations admission added: refused, as upstream.
    let replaced = r#"{"spec":{"tolerations":[{"key":"k","operator":"Exists"}]}}"#;
    // What may not: its resources, a longer deadline.
    let refused = |patch: &str, says: &str| {
        let out = std::process::Command::new("/usr/bin/kubectl")
            .args(["patch", "pod", "p", "--type=strategic", "-p", patch])
            .env("KUBECONFIG", server.kubeconfig())
            .env("HOME", server.scratch("home"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains("is invalid") && said.contains(says), "{patch}: {said}");
    };
    refused(
        r#"{"spec":{"containers":[{"name":"c","resources":{"requests":{"cpu":"200m"}}}]}}"#,
        "pod updates may not change fields other than",
    );
    refused(r#"{"spec":{"activeDeadlineSeconds":900}}"#, "must be less than or equal to previous value");
    refused(replaced, "existing toleration can not be modified");
    assert_eq!(
        kubectl(&["get", "pod", "p", "-o", "jsonpath={.spec.containers[0].image} {.spec.activeDeadlineSeconds}"], None),
        "busybox:1.36 300"
    );
}

#[test]
fn a_pod_replaced_without_its_empty_fields_is_the_same_pod() {
    // A protobuf body (client-go's) cannot carry `resources: {}`; nor need a client send
    // what defaulting fills in. Neither is a change of the spec.
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["run", "p", "--image=busybox", "--labels=job=x", "--", "sleep", "1000"], None);
    let mut pod: Value = serde_json::from_str(&kubectl(&["get", "pod", "p", "-o", "json"], None)).unwrap();
    let container = pod["spec"]["containers"][0].as_object_mut().unwrap();
    assert_eq!(container.remove("resources"), Some(serde_json::json!({})));
    container.remove("terminationMessagePath");
    pod["spec"].as_object_mut().unwrap().remove("securityContext");
    pod["metadata"]["labels"] = serde_json::json!({"job": "released"});
    kubectl(&["replace", "-f", "-"], Some(&pod.to_string()));
    let stored = kubectl(
        &["get", "pod", "p", "-o", "jsonpath={.metadata.labels.job} {.spec.containers[0].terminationMessagePath}"],
        None,
    );
    assert_eq!(stored, "released /dev/termination-log", "defaults filled in again");
}

#[test]
fn status_writes_keep_metadata_as_upstreams_strategies_do() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "job", "j", "--image=busybox", "--", "true"], None);
    let patch = r#"{"metadata":{"annotations":{"patchedstatus":"true"}},"status":{"conditions":[{"type":"Custom","status":"True","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;
    kubectl(&["patch", "job", "j", "--subresource=status", "--type=merge", "-p", patch], None);
    assert_eq!(kubectl(&["get", "job", "j", "-o", "jsonpath={.metadata.annotations.patchedstatus}"], None), "true");
    // A Deployment's status strategy keeps its labels.
    kubectl(&["create", "deployment", "d", "--image=busybox", "--replicas=0"], None);
    let patch =
        r#"{"metadata":{"labels":{"app":"patched-status"},"annotations":{"a":"b"}},"status":{"readyReplicas":0}}"#;
    kubectl(&["patch", "deployment", "d", "--subresource=status", "--type=merge", "-p", patch], None);
    assert_eq!(
        kubectl(&["get", "deployment", "d", "-o", "jsonpath={.metadata.labels.app} {.metadata.annotations.a}"], None),
        "d b"
    );
}

#[test]
fn a_strategic_patch_puts_a_new_container_first() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "deployment", "d", "--image=httpd", "--replicas=0"], None);
    let patch = r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"pause"}]}}}}"#;
    kubectl(&["patch", "deployment", "d", "--type=strategic", "-p", patch], None);
    assert_eq!(
        kubectl(&["get", "deployment", "d", "-o", "jsonpath={.spec.template.spec.containers[*].name}"], None),
        "sidecar httpd",
        "upstream's order: the patch's elements, then the others"
    );
    // And the new container is defaulted like one created with the object.
    assert_eq!(
        kubectl(
            &["get", "deployment", "d", "-o", "jsonpath={.spec.template.spec.containers[0].imagePullPolicy}"],
            None
        ),
        "Always"
    );
}

#[test]
fn a_deployment_adopts_the_replica_sets_its_selector_matches() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    let orphan = "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: before\n  labels: {app: web}\n  annotations: \
                  {deployment.kubernetes.io/revision: \"3546343826724305832\"}\nspec:\n  replicas: 0\n  \
                  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    \
                  spec: {containers: [{name: c, image: httpd}]}\n";
    kubectl(&["apply", "-f", "-"], Some(orphan));
    kubectl(&["create", "deployment", "web", "--image=busybox", "--replicas=0"], None);
    let owner = || kubectl(&["get", "rs", "before", "-o", "jsonpath={.metadata.ownerReferences[*].kind}"], None);
    eventually("the ReplicaSet adopted", || owner() == "Deployment");
    eventually("the next revision after the adopted one", || {
        kubectl(
            &[
                "get",
                "deployment",
                "web",
                "-o",
                "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
            ],
            None,
        ) == "3546343826724305833"
    });
    // Relabelled out of the selector, it is let go.
    kubectl(&["label", "rs", "before", "app=other", "--overwrite"], None);
    eventually("the ReplicaSet released", || owner().is_empty());
}

#[test]
fn a_replication_controller_says_when_quota_refuses_its_pods() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "quota", "condition-test", "--hard=pods=2"], None);
    eventually("the quota's status", || {
        kubectl(&["get", "quota", "condition-test", "-o", "jsonpath={.status.used.pods}"], None) == "0"
    });
    let rc = "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: condition-test}\nspec:\n  replicas: 3\n  \
              template:\n    metadata: {labels: {name: condition-test}}\n    spec: {containers: [{name: c, image: busybox}]}\n";
    kubectl(&["apply", "-f", "-"], Some(rc));
    let condition = || {
        kubectl(
            &[
                "get",
                "rc",
                "condition-test",
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="ReplicaFailure")].message}"#,
            ],
            None,
        )
    };
    eventually("the failure surfaced", || condition().contains("exceeded quota: condition-test"));
    assert!(condition().contains("forbidden"), "{}", condition());
    kubectl(&["scale", "rc", "condition-test", "--replicas=2"], None);
    eventually("the failure gone", || condition().is_empty());
}

#[test]
fn strict_field_validation_reports_unknown_and_duplicate_fields() {
    let server = server();
    let body = r#"{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "my-dep"},
        "spec": {"unknownField": "foo", "replicas": 2, "replicas": 3,
                 "selector": {"matchLabels": {"app": "nginx"}},
                 "template": {"metadata": {"labels": {"app": "nginx"}},
                              "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}}}"#;
    let post = |validation: &str| {
        server.curl(
            "POST",
            &format!("/apis/apps/v1/namespaces/default/deployments?fieldValidation={validation}"),
            true,
            &["-H", "Content-Type: application/json", "--data-binary", body],
        )
    };
    let (code, refused) = post("Strict");
    assert_eq!(code, 400, "{refused}");
    assert!(
        refused.contains(
            r#"strict decoding error: unknown field \"spec.unknownField\", duplicate field \"spec.replicas\""#
        ),
        "{refused}"
    );
    // Warn (the default): created, the last value winning, as upstream's decoder does.
    let (code, created) = post("Warn");
    assert_eq!(code, 201, "{created}");
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["spec"]["replicas"], 3);
}

#[test]
fn runtime_classes_admit_pods_and_sysctl_names_are_checked() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    let class = "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: gvisor}\nhandler: runsc\n\
                 overhead: {podFixed: {cpu: 250m, memory: 120Mi}}\n\
                 scheduling: {nodeSelector: {sandbox: \"true\"}, tolerations: [{key: sandbox, operator: Exists}]}\n";
    kubectl(&["apply", "-f", "-"], Some(class));
    let pod = |name: &str, class: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  runtimeClassName: {class}\n  \
             containers: [{{name: c, image: busybox}}]\n"
        )
    };
    kubectl(&["apply", "-f", "-"], Some(&pod("sandboxed", "gvisor")));
    let admitted = kubectl(
        &[
            "get",
            "pod",
            "sandboxed",
            "-o",
            "jsonpath={.spec.overhead.cpu} {.spec.nodeSelector.sandbox} {.spec.tolerations[*].key}",
        ],
        None,
    );
    assert!(admitted.starts_with("250m true ") && admitted.ends_with(" sandbox"), "{admitted}");
    let refused = server.kubectl_fails(&["apply", "-f", "-"], Some(&pod("lost", "missing")));
    assert!(
        refused.contains(r#"pods "lost" is forbidden: pod rejected: RuntimeClass "missing" not found"#),
        "{refused}"
    );
    let sysctls = "apiVersion: v1\nkind: Pod\nmetadata: {name: s}\nspec:\n  securityContext:\n    sysctls:\n    \
                   - {name: foo-, value: bar}\n    - {name: kernel.shmmax, value: \"1\"}\n    \
                   - {name: safe-and-unsafe, value: \"1\"}\n    - {name: bar.., value: \"42\"}\n  \
                   containers: [{name: c, image: busybox}]\n";
    let refused = server.kubectl_fails(&["apply", "-f", "-"], Some(sysctls));
    assert!(refused.contains(r#"Invalid value: "foo-""#) && refused.contains(r#"Invalid value: "bar..""#), "{refused}");
    assert!(!refused.contains("safe-and-unsafe") && !refused.contains("kernel.shmmax"), "{refused}");
}

#[test]
fn immutable_config_maps_and_secrets_keep_their_data() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "configmap", "c", "--from-literal=a=b"], None);
    kubectl(&["create", "secret", "generic", "s", "--from-literal=a=b"], None);
    for kind in ["configmap/c", "secret/s"] {
        // Data may change until it is made immutable, together with the data.
        kubectl(&["patch", kind, "--type=merge", "-p", r#"{"immutable":true,"data":{"a":"Yw=="}}"#], None);
        let refused = server.kubectl_fails(&["patch", kind, "--type=merge", "-p", r#"{"data":{"a":"ZA=="}}"#], None);
        assert!(
            refused.contains("is invalid")
                && refused.contains("data: Forbidden: field is immutable when `immutable` is set"),
            "{refused}"
        );
        let refused = server.kubectl_fails(&["patch", kind, "--type=merge", "-p", r#"{"immutable":false}"#], None);
        assert!(refused.contains("immutable: Forbidden"), "{refused}");
        // Metadata still changes.
        kubectl(&["label", kind, "x=y"], None);
    }
    let refused =
        server.kubectl_fails(&["patch", "secret/s", "--type=merge", "-p", r#"{"stringData":{"a":"e"}}"#], None);
    assert!(refused.contains("field is immutable"), "{refused}");
}

#[test]
fn services_change_type_to_and_from_external_name() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "service", "clusterip", "s", "--tcp=80"], None);
    let ip = kubectl(&["get", "service", "s", "-o", "jsonpath={.spec.clusterIP}"], None);
    assert!(!ip.is_empty());
    kubectl(
        &[
            "patch",
            "service",
            "s",
            "--type=merge",
            "-p",
            r#"{"spec":{"type":"ExternalName","externalName":"db.example.com"}}"#,
        ],
        None,
    );
    assert_eq!(
        kubectl(&["get", "service", "s", "-o", "jsonpath={.spec.clusterIP}|{.spec.externalName}"], None),
        "|db.example.com"
    );
    // Its address is free again: a new Service may ask for it.
    kubectl(&["create", "service", "clusterip", "t", "--tcp=80", &format!("--clusterip={ip}")], None);
    // And back: a NodePort Service gets an address and a node port.
    kubectl(
        &["patch", "service", "s", "--type=merge", "-p", r#"{"spec":{"type":"NodePort","externalName":null}}"#],
        None,
    );
    let got = kubectl(&["get", "service", "s", "-o", "jsonpath={.spec.clusterIP} {.spec.ports[0].nodePort}"], None);
    let (address, port) = got.split_once(' ').unwrap();
    assert!(!address.is_empty() && address != ip && port.parse::<u16>().is_ok(), "{got}");
    // NodePort to ExternalName changing only the type: the node port goes too.
    kubectl(
        &[
            "patch",
            "service",
            "s",
            "--type=merge",
            "-p",
            r#"{"spec":{"type":"ExternalName","externalName":"x.example.com"}}"#,
        ],
        None,
    );
    assert_eq!(
        kubectl(&["get", "service", "s", "-o", "jsonpath={.spec.clusterIP}|{.spec.ports[0].nodePort}"], None),
        "|"
    );
}

#[test]
fn endpoints_of_a_service_without_selector_are_mirrored_as_slices() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    let manifests = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: ext}}\nspec: {{ports: [{{name: web, port: 80}}]}}\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: ext}}\nsubsets:\n\
             - addresses: [{{ip: {ip}}}]\n  ports: [{{name: web, port: 8080}}]\n"
        )
    };
    kubectl(&["apply", "-f", "-"], Some(&manifests("10.1.2.3")));
    let slice = || {
        kubectl(
            &[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=ext,endpointslice.kubernetes.io/managed-by=endpointslicemirroring-controller.k8s.io",
                "-o",
                "jsonpath={.items[*].endpoints[*].addresses[0]}:{.items[*].ports[*].port}",
            ],
            None,
        )
    };
    eventually("the mirrored slice", || slice() == "10.1.2.3:8080");
    kubectl(&["apply", "-f", "-"], Some(&manifests("10.1.2.4")));
    eventually("the slice follows", || slice() == "10.1.2.4:8080");
    kubectl(&["delete", "endpoints", "ext"], None);
    eventually("the slice gone", || slice() == ":");
}

#[test]
fn ingresses_have_a_status_subresource() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "ingress", "web", "--rule=example.com/=web:80"], None);
    let status = r#"{"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.7"}]}}}"#;
    kubectl(&["patch", "ingress", "web", "--subresource=status", "--type=merge", "-p", status], None);
    assert_eq!(
        kubectl(&["get", "ingress", "web", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"], None),
        "203.0.113.7"
    );
    // A plain update keeps the status.
    kubectl(&["patch", "ingress", "web", "--type=merge", "-p", r#"{"status":{"loadBalancer":{}}}"#], None);
    assert_eq!(
        kubectl(&["get", "ingress", "web", "-o", "jsonpath={.status.loadBalancer.ingress[0].ip}"], None),
        "203.0.113.7"
    );
}

#[test]
fn config_keys_and_micro_times_are_checked_and_written_as_upstream() {
    let server = server();
    let empty_key = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {\"\": dmFsdWU=}\n";
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(empty_key));
    assert!(
        error.contains(r#"data[]: Invalid value: "": a valid config key must consist of alphanumeric characters"#),
        "{error}"
    );
    let lease = "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: l}\nspec: {acquireTime: \"2026-12-06T01:02:03Z\"}\n";
    server.kubectl(&["apply", "-f", "-"], Some(lease));
    let time = server.kubectl(&["get", "lease", "l", "-o", "jsonpath={.spec.acquireTime}"], None);
    assert_eq!(time, "2026-12-06T01:02:03.000000Z");
}

#[test]
fn limit_ranges_default_and_bound_what_pods_ask() {
    let server = server();
    let kubectl = |args: &[&str], stdin: Option<&str>| server.kubectl(args, stdin);
    kubectl(&["create", "namespace", "limited"], None);
    let range = "apiVersion: v1\nkind: LimitRange\nmetadata: {name: lr, namespace: limited}\nspec:\n  limits:\n  \
                 - type: Container\n    min: {cpu: 50m, memory: 100Mi}\n    max: {cpu: 500m, memory: 500Mi}\n    \
                 defaultRequest: {cpu: 100m, memory: 200Mi}\n";
    kubectl(&["apply", "-f", "-"], Some(range));
    // The default limit is the max, as upstream defaults the item.
    let item = kubectl(&["get", "limitrange", "lr", "-n", "limited", "-o", "jsonpath={.spec.limits[0].default}"], None);
    assert_eq!(item, r#"{"cpu":"500m","memory":"500Mi"}"#);
    let resources = |pod: &str| {
        kubectl(&["get", "pod", pod, "-n", "limited", "-o", "jsonpath={.spec.containers[0].resources}"], None)
    };
    let probes = std::cell::Cell::new(0);
    eventually("the limit range to apply", || {
        probes.set(probes.get() + 1);
        let name = format!("probe-{}", probes.get());
        server.kubectl_ok(&["run", &name, "-n", "limited", "--image=busybox"]);
        resources(&name).contains("500Mi")
    });
    kubectl(&["run", "bare", "-n", "limited", "--image=busybox"], None);
    assert_eq!(
        resources("bare"),
        r#"{"limits":{"cpu":"500m","memory":"500Mi"},"requests":{"cpu":"100m","memory":"200Mi"}}"#
    );
    let annotation = kubectl(
        &[
            "get",
            "pod",
            "bare",
            "-n",
            "limited",
            "-o",
            r#"jsonpath={.metadata.annotations.kubernetes\.io/limit-ranger}"#,
        ],
        None,
    );
    assert_eq!(
        annotation,
        "LimitRanger plugin set: cpu, memory request for container bare; cpu, memory limit for container bare"
    );
    // A limit without a request: the request is the limit (pod defaulting), then the range's
    // default limit fills the rest.
    let partial = "apiVersion: v1\nkind: Pod\nmetadata: {name: partial, namespace: limited}\nspec:\n  containers:\n  \
                   - {name: c, image: busybox, resources: {limits: {cpu: 300m}}}\n";
    kubectl(&["apply", "-f", "-"], Some(partial));
    assert_eq!(
        resources("partial"),
        r#"{"limits":{"cpu":"300m","memory":"500Mi"},"requests":{"cpu":"300m","memory":"200Mi"}}"#
    );
    let greedy = partial.replace("partial", "greedy").replace("cpu: 300m", "cpu: 600m");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&greedy));
    assert!(
        error.contains(r#"pods "greedy" is forbidden: maximum cpu usage per Container is 500m, but limit is 600m"#),
        "{error}"
    );
}

#[test]
fn lists_and_watches_from_the_cache_are_current_and_byte_for_byte_the_objects() {
    let server = server();
    let curl_json = |method: &str, path: &str, body: Option<&Value>| -> Value {
        let data = body.map(|b| b.to_string()).unwrap_or_default();
        let mut extra = vec!["-H", "Content-Type: application/json"];
        if body.is_some() {
            extra.extend(["--data-binary", data.as_str()]);
        }
        let (code, text) = server.curl(method, path, true, &extra);
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    };
    let maps = "/api/v1/namespaces/default/configmaps";
    let mut names = Vec::new();
    for i in 0..12 {
        let name = format!("m{i}");
        let created = curl_json(
            "POST",
            maps,
            Some(
                &serde_json::json!({"metadata": {"name": name, "labels": {"n": i.to_string()}}, "data": {"k": "v\"\n"}}),
            ),
        );
        names.push(name);
        let written: i64 = created["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        // A list without resourceVersion reads its writes, whole and as GET shows each object.
        let list = curl_json("GET", maps, None);
        assert_eq!(list["kind"], "ConfigMapList");
        assert_eq!(list["apiVersion"], "v1");
        let at: i64 = list["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        assert!(at >= written, "listed at {at}, before the write at {written}");
        let items = list["items"].as_array().unwrap();
        let listed: Vec<&str> = items.iter().filter_map(|m| m["metadata"]["name"].as_str()).collect();
        for name in &names {
            assert!(listed.contains(&name.as_str()), "{name} missing from {listed:?}");
        }
        let shown = items.iter().find(|m| m["metadata"]["name"] == created["metadata"]["name"]).unwrap();
        assert_eq!(*shown, created);
    }
    // A write elsewhere moves the store on; the list is current at it.
    let secret = curl_json(
        "POST",
        "/api/v1/namespaces/default/secrets",
        Some(&serde_json::json!({"metadata": {"name": "s"}, "stringData": {"a": "b"}})),
    );
    let list = curl_json("GET", maps, None);
    assert!(
        list["metadata"]["resourceVersion"].as_str().unwrap().parse::<i64>().unwrap()
            >= secret["metadata"]["resourceVersion"].as_str().unwrap().parse::<i64>().unwrap()
    );
    // Selectors, tables and resourceVersion=0 still select and render.
    let selected = curl_json("GET", &format!("{maps}?labelSelector=n%3D3"), None);
    assert_eq!(selected["items"].as_array().unwrap().len(), 1);
    assert_eq!(curl_json("GET", &format!("{maps}?resourceVersion=0"), None)["items"], list["items"]);
    let table = server.kubectl(&["get", "configmaps", "--chunk-size=0", "-l", "n", "--no-headers"], None);
    assert_eq!(table.lines().count(), 12, "{table}");
    // A watch from the list sends each change as GET shows the object.
    let from = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let watcher = server
        .admin_curl(&format!("{maps}?watch=true&resourceVersion={from}&timeoutSeconds=3"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let created = curl_json("POST", maps, Some(&serde_json::json!({"metadata": {"name": "w"}, "data": {"x": "ü"}})));
    let output = watcher.wait_with_output().unwrap();
    let events: Vec<Value> =
        String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"], created);
}
