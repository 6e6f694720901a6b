//! API aggregation with the real kubectl against a real `tugboat server`: every built-in group
//! version has a local APIService; an APIService that names a Service puts its group version
//! behind an API server of the test's own (HTTPS on loopback, reached through a Service whose
//! Endpoints name it), which trusts the front-proxy CA the server publishes in
//! `kube-system/extension-apiserver-authentication` and learns the caller from `X-Remote-User`.
//! Discovery merges the remote's resources, kubectl lists them, and `Available` follows the
//! remote.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};
use tugboat_testkit::TugboatServer;

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The remote's answers: its discovery document, and a list whose one item is named after the
/// user the front proxy says is asking.
fn answer(path: &str, user: &str, groups: usize) -> (u16, Value) {
    match path {
        "/apis/wardle.example.com/v1alpha1" => (
            200,
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "wardle.example.com/v1alpha1",
                "resources": [{"name": "flunders", "singularName": "flunder", "namespaced": true, "kind": "Flunder",
                               "verbs": ["get", "list"], "shortNames": ["fl"]}]}),
        ),
        "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders" => (
            200,
            json!({"kind": "FlunderList", "apiVersion": "wardle.example.com/v1alpha1", "metadata": {"resourceVersion": "1"},
                "items": [{"kind": "Flunder", "apiVersion": "wardle.example.com/v1alpha1",
                           "metadata": {"name": format!("seen-by-{user}-in-{groups}-groups"), "namespace": "default",
                                        "creationTimestamp": "2026-01-01T00:00:00Z"}}]}),
        ),
        _ => {
            (404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound"}))
        }
    }
}

/// The remote API server: client certificates must come from `front_proxy_ca`.
fn remote(front_proxy_ca: &str) -> (tokio::runtime::Runtime, u16, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = tugboat_pki::ClusterCa::load_or_create(dir.path()).unwrap();
    let (cert_pem, key_pem) = ca
        .sign(&tugboat_pki::CertSpec {
            common_name: "api.wardle.svc".into(),
            organizations: Vec::new(),
            dns_names: vec!["api.wardle.svc".into()],
            ip_addresses: Vec::new(),
            usage: tugboat_pki::Usage::Server,
            validity: Duration::from_secs(3600),
        })
        .unwrap();
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).unwrap().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut front_proxy_ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // No front-proxy client certificate: no TLS session.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                    let header = |name: &str| {
                        request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
                    };
                    let groups = request.headers().get_all("x-remote-group").iter().count();
                    let (code, body) = if header("host").is_empty() {
                        // As Go's net/http, which every real aggregated server runs on.
                        (400, json!("400 Bad Request: missing required Host header"))
                    } else {
                        answer(request.uri().path(), &header("x-remote-user"), groups)
                    };
                    let mut response = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
                    *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
                    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(response)
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (runtime, port, ca.cert_pem().to_string(), dir)
}

#[test]
fn an_api_service_puts_a_group_behind_a_service_and_kubectl_uses_it() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    // Every built-in group version is a local APIService, available.
    wait_for("the local APIServices to be available", || {
        let table = server.kubectl(&["get", "apiservices"], None);
        table.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()[..3] == ["v1.apps", "Local", "True"])
    });
    let table = server.kubectl(&["get", "apiservices"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SERVICE", "AVAILABLE", "AGE"]);
    assert!(table.contains("v1beta1.metrics.k8s.io"), "{table}");

    // The remote trusts the front-proxy CA the server publishes.
    let published = server
        .kubectl(&["get", "configmap", "-n", "kube-system", "extension-apiserver-authentication", "-o", "json"], None);
    let published: Value = serde_json::from_str(&published).unwrap();
    let front_proxy_ca = published["data"]["requestheader-client-ca-file"].as_str().unwrap();
    assert_eq!(published["data"]["requestheader-allowed-names"], r#"["front-proxy-client"]"#);
    let (runtime, port, ca_pem, _dir) = remote(front_proxy_ca);
    let objects = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: wardle}}
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: wardle}}
spec:
  ports: [{{port: 443, targetPort: {port}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: api, namespace: wardle}}
subsets:
- addresses: [{{ip: 127.0.0.1}}]
  ports: [{{port: {port}}}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: v1alpha1.wardle.example.com}}
spec:
  group: wardle.example.com
  version: v1alpha1
  groupPriorityMinimum: 1000
  versionPriority: 15
  service: {{namespace: wardle, name: api}}
  caBundle: {ca}
"#,
        ca = base64::engine::general_purpose::STANDARD.encode(&ca_pem)
    );
    server.kubectl(&["apply", "-f", "-"], Some(&objects));
    let available = || {
        server.kubectl(
            &["get", "apiservice", "v1alpha1.wardle.example.com", "-o", "jsonpath={.status.conditions[0].status}"],
            None,
        )
    };
    wait_for("the APIService to be available", || available() == "True");
    // Once the APIService says Available, aggregated discovery lists its resources as current
    // (client-go's discovery drops a `Stale` group version as failed).
    let aggregated = || {
        let accept = "Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
        let (code, body) = server.curl("GET", "/apis", true, &["-H", accept]);
        assert_eq!(code, 200, "{body}");
        let document: Value = serde_json::from_str(&body).unwrap();
        let group =
            document["items"].as_array().unwrap().iter().find(|g| g["metadata"]["name"] == "wardle.example.com");
        group.expect("the remote group is listed")["versions"][0].clone()
    };
    let version = aggregated();
    assert_eq!(version["freshness"], "Current", "{version}");
    assert_eq!(version["resources"][0]["resource"], "flunders", "{version}");

    // Discovery merges the remote's resources: kubectl finds and lists them, and the remote
    // learns who asks from the front proxy.
    let resources = server.kubectl(&["api-resources", "--api-group=wardle.example.com"], None);
    assert!(resources.contains("flunders") && resources.contains("fl"), "{resources}");
    let listed = server.kubectl(&["get", "flunders", "-n", "default", "-o", "name"], None);
    assert_eq!(listed.trim(), "flunder.wardle.example.com/seen-by-kubernetes-admin-in-2-groups");
    // RBAC judges an aggregated request by its resource, as any other.
    let refused = server.kubectl_fails(&["get", "flunders", "-n", "default", "--as=jane"], None);
    assert!(
        refused.contains(r#"User "jane" cannot list resource "flunders" in API group "wardle.example.com" in the namespace "default""#),
        "{refused}"
    );
    server.kubectl(
        &["create", "role", "flunder-reader", "-n", "default", "--verb=list", "--resource=flunders.wardle.example.com"],
        None,
    );
    server.kubectl(
        &["create", "rolebinding", "jane-reads", "-n", "default", "--role=flunder-reader", "--user=jane"],
        None,
    );
    let listed = server.kubectl(&["get", "flunders", "-n", "default", "-o", "name", "--as=jane"], None);
    assert!(listed.contains("seen-by-jane"), "{listed}");
    // An extension server delegates the checking of its callers through the bootstrap role
    // upstream's charts bind (system:auth-delegator).
    let can_review =
        |what: &str| server.kubectl_ok(&["auth", "can-i", "create", what, "--as=system:serviceaccount:wardle:default"]);
    assert_eq!(can_review("subjectaccessreviews.authorization.k8s.io"), None, "kubectl says no, and fails");
    server.kubectl(
        &[
            "create",
            "clusterrolebinding",
            "wardle:auth-delegator",
            "--clusterrole=system:auth-delegator",
            "--serviceaccount=wardle:default",
        ],
        None,
    );
    assert_eq!(can_review("subjectaccessreviews.authorization.k8s.io").as_deref(), Some("yes\n"));
    assert_eq!(can_review("tokenreviews.authentication.k8s.io").as_deref(), Some("yes\n"));
    // And reads the front-proxy ConfigMap through the Role naming it: a list or watch of that
    // one name (its informer's field selector) is judged as of that name.
    server.kubectl(
        &[
            "create",
            "rolebinding",
            "wardle:authentication-reader",
            "-n",
            "kube-system",
            "--role=extension-apiserver-authentication-reader",
            "--serviceaccount=wardle:default",
        ],
        None,
    );
    let as_wardle = "--as=system:serviceaccount:wardle:default";
    let named = server.kubectl(
        &[
            "get",
            "configmaps",
            "-n",
            "kube-system",
            "--field-selector=metadata.name=extension-apiserver-authentication",
            "-o",
            "name",
            as_wardle,
        ],
        None,
    );
    assert_eq!(named.trim(), "configmap/extension-apiserver-authentication");
    let refused = server.kubectl_fails(&["get", "configmaps", "-n", "kube-system", as_wardle], None);
    assert!(refused.contains("cannot list resource \"configmaps\""), "{refused}");
    let (code, _) = server.curl("GET", "/apis/wardle.example.com/v1alpha1/namespaces/default/nothing", true, &[]);
    assert_eq!(code, 404, "the remote's own answers come back");
    let (code, groups) = server.curl("GET", "/apis", true, &[]);
    assert_eq!(code, 200);
    assert!(groups.contains(r#""groupVersion":"wardle.example.com/v1alpha1""#), "{groups}");

    // The remote goes away: the APIService says so, and requests get 503.
    drop(runtime);
    wait_for("the APIService to be unavailable", || available() == "False");
    let version = aggregated();
    assert_eq!(version["freshness"], "Stale", "the last document stays listed, stale: {version}");
    assert_eq!(version["resources"][0]["resource"], "flunders", "{version}");
    let (code, _) = server.curl("GET", "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders", true, &[]);
    assert_eq!(code, 503);
}

#[test]
fn horizontal_pod_autoscalers_are_served_in_autoscaling_v1_and_v2() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let groups = server.kubectl(&["api-versions"], None);
    assert!(groups.contains("autoscaling/v1") && groups.contains("autoscaling/v2"), "{groups}");
    let v2 = r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  maxReplicas: 5
  metrics:
  - {type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}}
  - {type: Resource, resource: {name: memory, target: {type: AverageValue, averageValue: 100Mi}}}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(v2));
    let v1: Value = serde_json::from_str(
        &server.kubectl(&["get", "horizontalpodautoscalers.v1.autoscaling", "web", "-o", "json"], None),
    )
    .unwrap();
    assert_eq!(v1["apiVersion"], "autoscaling/v1");
    assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
    assert!(
        v1["metadata"]["annotations"]["autoscaling.alpha.kubernetes.io/metrics"].as_str().unwrap().contains("memory"),
        "{v1}"
    );
    // A v1 client's update keeps what only v2 says.
    server.kubectl(
        &[
            "patch",
            "horizontalpodautoscalers.v1.autoscaling",
            "web",
            "-p",
            r#"{"spec":{"targetCPUUtilizationPercentage":70}}"#,
        ],
        None,
    );
    let metrics = server.kubectl(
        &[
            "get",
            "horizontalpodautoscalers.v2.autoscaling",
            "web",
            "-o",
            "jsonpath={.spec.metrics[*].resource.name} {.spec.metrics[0].resource.target.averageUtilization}",
        ],
        None,
    );
    assert_eq!(metrics, "cpu memory 70");
    // Created through v1: stored as v2.
    let v1 = "apiVersion: autoscaling/v1\nkind: HorizontalPodAutoscaler\nmetadata: {name: old}\nspec: {scaleTargetRef: {kind: Deployment, name: old}, maxReplicas: 3, targetCPUUtilizationPercentage: 60}\n";
    server.kubectl(&["apply", "-f", "-"], Some(v1));
    let target = server.kubectl(
        &[
            "get",
            "horizontalpodautoscalers.v2.autoscaling",
            "old",
            "-o",
            "jsonpath={.spec.metrics[0].resource.target.averageUtilization}",
        ],
        None,
    );
    assert_eq!(target, "60");
    let table = server.kubectl(&["get", "hpa"], None);
    assert!(table.contains("cpu: <unknown>/60%"), "{table}");
}
