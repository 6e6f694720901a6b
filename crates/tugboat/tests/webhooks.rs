//! Admission webhooks with the real kubectl against a real `tugboat server`: a webhook server
//! of the test's own (HTTPS on loopback, its certificate signed by a CA the test makes and
//! hands over as `caBundle`) mutates and refuses objects, reached through a Service (as
//! `<service>.<namespace>.svc`) or a URL; rules, namespace and object selectors and CEL match
//! conditions choose what it sees; failure policies, timeouts, dry runs, warnings and the
//! configurations' own validation behave as upstream's.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use tugboat_testkit::TugboatServer;

/// The webhook server: answers AdmissionReviews by path; counts the reviews it got.
struct Webhook {
    address: SocketAddr,
    ca_pem: String,
    reviews: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

/// What the test webhook answers for `path`.
fn answer(path: &str, request: &Value) -> Value {
    let uid = request["uid"].clone();
    let object = &request["object"];
    let labels = &object["metadata"]["labels"];
    match path {
        // Adds a label (and the labels map if there is none).
        "/add-label" => {
            let patch = if labels.is_object() {
                json!([{"op": "add", "path": "/metadata/labels/webhook-added", "value": "yes"}])
            } else {
                json!([{"op": "add", "path": "/metadata/labels", "value": {"webhook-added": "yes"}}])
            };
            let patch = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
            json!({"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch})
        }
        // Refuses what is labelled `deny: "yes"`; warns about everything else.
        "/deny-labelled" => {
            if labels["deny"] == "yes" {
                json!({"uid": uid, "allowed": false, "status": {"message": "the object is labelled deny", "code": 403}})
            } else {
                json!({"uid": uid, "allowed": true, "warnings": ["seen by the test webhook"]})
            }
        }
        // Reviews HorizontalPodAutoscalers as autoscaling/v1 whatever version was asked for;
        // sets a v1 field when the request came as v2, refuses what it does not expect.
        "/hpa-as-v1" => {
            let seen = (
                request["kind"]["version"].as_str(),
                request["resource"]["version"].as_str(),
                request["requestKind"]["version"].as_str(),
                request["requestResource"]["version"].as_str(),
                object["apiVersion"].as_str(),
                object["spec"]["targetCPUUtilizationPercentage"].as_i64(),
            );
            match seen {
                (Some("v1"), Some("v1"), Some("v1"), Some("v1"), Some("autoscaling/v1"), _) => {
                    json!({"uid": uid, "allowed": true})
                }
                (Some("v1"), Some("v1"), Some("v2"), Some("v2"), Some("autoscaling/v1"), Some(80)) => {
                    let patch = json!([{"op": "replace", "path": "/spec/targetCPUUtilizationPercentage", "value": 42}]);
                    let patch = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
                    json!({"uid": uid, "allowed": true, "patchType": "JSONPatch", "patch": patch})
                }
                other => {
                    json!({"uid": uid, "allowed": false, "status": {"message": format!("unexpected review {other:?}")}})
                }
            }
        }
        _ => json!({"uid": uid, "allowed": false, "status": {"message": format!("no handler for {path}")}}),
    }
}

/// The test's conversion webhook: v1 gadgets have `spec.hostPort: "host:port"`, v2 ones
/// `spec.host` and `spec.port`.
fn convert(review: &Value) -> Value {
    let request = &review["request"];
    let desired = request["desiredAPIVersion"].as_str().unwrap_or_default();
    let objects = request["objects"].as_array().cloned().unwrap_or_default();
    let converted: Vec<Value> = objects
        .into_iter()
        .map(|mut object| {
            let spec = object["spec"].take();
            object["spec"] = match desired {
                "example.com/v2" => {
                    let (host, port) = spec["hostPort"].as_str().unwrap_or_default().split_once(':').unwrap_or_default();
                    json!({"host": host, "port": port})
                }
                _ => json!({"hostPort": format!("{}:{}", spec["host"].as_str().unwrap_or_default(), spec["port"].as_str().unwrap_or_default())}),
            };
            object["apiVersion"] = json!(desired);
            object
        })
        .collect();
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview",
        "response": {"uid": request["uid"], "result": {"status": "Success"}, "convertedObjects": converted}})
}

impl Webhook {
    fn start() -> Webhook {
        let dir = tempfile::tempdir().unwrap();
        let ca = tugboat_pki::ClusterCa::load_or_create(dir.path()).unwrap();
        let (cert_pem, key_pem) = ca
            .sign(&tugboat_pki::CertSpec {
                common_name: "hook.hooks.svc".into(),
                organizations: Vec::new(),
                dns_names: vec!["hook.hooks.svc".into()],
                ip_addresses: vec!["127.0.0.1".parse().unwrap()],
                usage: tugboat_pki::Usage::Server,
                validity: Duration::from_secs(3600),
            })
            .unwrap();
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).unwrap().unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let address = listener.local_addr().unwrap();
        let reviews = Arc::new(AtomicUsize::new(0));
        let counted = reviews.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let counted = counted.clone();
                        async move {
                            let path = request.uri().path().to_string();
                            let json_body = request.headers().get("content-type").is_some_and(|v| v == "application/json");
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let review: Value = serde_json::from_slice(&body).unwrap_or_default();
                            counted.fetch_add(1, Ordering::SeqCst);
                            if path == "/slow" {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            }
                            if path == "/convert" {
                                let reply = convert(&review);
                                return Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(reply.to_string()))));
                            }
                            let mut response = answer(&path, &review["request"]);
                            if !json_body || review["apiVersion"] != "admission.k8s.io/v1" {
                                response = json!({"uid": review["request"]["uid"], "allowed": false,
                                    "status": {"message": "not an admission.k8s.io/v1 review in JSON"}});
                            }
                            let reply = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(reply.to_string()))))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Webhook { address, ca_pem: ca.cert_pem().to_string(), reviews, _runtime: runtime, _dir: dir }
    }

    fn ca_bundle(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.ca_pem)
    }

    fn reviews(&self) -> usize {
        self.reviews.load(Ordering::SeqCst)
    }
}

/// A number not used before in this process (for names of probe objects).
fn unique() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The namespace the webhooks watch, and the Service (no selector; its Endpoints name the
/// webhook server) they reach it through.
fn setup(server: &TugboatServer, webhook: &Webhook) {
    let port = webhook.address.port();
    let objects = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: hooks, labels: {{webhooks: "on"}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: quiet}}
---
apiVersion: v1
kind: Service
metadata: {{name: hook, namespace: hooks}}
spec:
  ports: [{{port: 8443, targetPort: {port}}}]
---
apiVersion: v1
kind: Endpoints
metadata: {{name: hook, namespace: hooks}}
subsets:
- addresses: [{{ip: 127.0.0.1}}]
  ports: [{{port: {port}}}]
"#
    );
    server.kubectl(&["apply", "-f", "-"], Some(&objects));
}

fn mutating(webhook: &Webhook) -> String {
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: add-label}}
webhooks:
- name: add-label.hooks.example.com
  clientConfig:
    service: {{namespace: hooks, name: hook, port: 8443, path: /add-label}}
    caBundle: {ca}
  rules:
  - {{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [configmaps]}}
  namespaceSelector: {{matchLabels: {{webhooks: "on"}}}}
  matchConditions:
  - {{name: not-skipped, expression: "object.metadata.name != 'skip-me'"}}
  sideEffects: None
  admissionReviewVersions: [v1]
"#,
        ca = webhook.ca_bundle()
    )
}

fn validating(webhook: &Webhook) -> String {
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: deny-labelled}}
webhooks:
- name: deny-labelled.hooks.example.com
  clientConfig:
    url: https://127.0.0.1:{port}/deny-labelled
    caBundle: {ca}
  rules:
  - {{operations: [CREATE, UPDATE], apiGroups: [""], apiVersions: [v1], resources: [pods, configmaps]}}
  objectSelector: {{matchExpressions: [{{key: checked, operator: DoesNotExist}}]}}
  namespaceSelector: {{matchLabels: {{webhooks: "on"}}}}
  sideEffects: None
  admissionReviewVersions: [v1, v1beta1]
"#,
        port = webhook.address.port(),
        ca = webhook.ca_bundle()
    )
}

fn label(server: &TugboatServer, namespace: &str, name: &str) -> String {
    server.kubectl(
        &["get", "configmap", name, "-n", namespace, "-o", r#"jsonpath={.metadata.labels.webhook-added}"#],
        None,
    )
}

#[test]
fn webhooks_mutate_and_refuse_what_their_rules_and_selectors_take() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let webhook = Webhook::start();
    setup(&server, &webhook);
    server.kubectl(&["apply", "-f", "-"], Some(&mutating(&webhook)));
    server.kubectl(&["apply", "-f", "-"], Some(&validating(&webhook)));
    let table = server.kubectl(&["get", "mutatingwebhookconfigurations"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "WEBHOOKS", "AGE"]);
    assert!(table.lines().nth(1).unwrap().starts_with("add-label "), "{table}");
    let stored = server.kubectl(&["get", "validatingwebhookconfiguration", "deny-labelled", "-o", "json"], None);
    let stored: Value = serde_json::from_str(&stored).unwrap();
    let defaulted = &stored["webhooks"][0];
    assert_eq!((defaulted["failurePolicy"].as_str(), defaulted["timeoutSeconds"].as_i64()), (Some("Fail"), Some(10)));
    assert_eq!(defaulted["rules"][0]["scope"], "*");

    // The mutating webhook (through the Service) labels configmaps in the namespace it selects,
    // except the one its CEL condition skips; the validating one (by URL) warns.
    wait_for("the mutating webhook to take effect", || {
        let name = format!("probe-{}", unique());
        server.kubectl(&["create", "configmap", &name, "-n", "hooks"], None);
        label(&server, "hooks", &name) == "yes"
    });
    let (_, warnings) = server.kubectl_with_stderr(&["create", "configmap", "plain", "-n", "hooks"], None);
    assert!(warnings.contains("Warning: seen by the test webhook"), "{warnings}");
    assert_eq!(label(&server, "hooks", "plain"), "yes");
    server.kubectl(&["create", "configmap", "skip-me", "-n", "hooks"], None);
    assert_eq!(label(&server, "hooks", "skip-me"), "", "the match condition skips it");
    server.kubectl(&["create", "configmap", "elsewhere", "-n", "quiet"], None);
    assert_eq!(label(&server, "quiet", "elsewhere"), "", "the namespace selector leaves it");

    // A server-side dry run goes through the webhooks (they declare no side effects).
    let dry = server.kubectl(
        &["create", "configmap", "dry", "-n", "hooks", "--dry-run=server", "-o", "jsonpath={.metadata.labels}"],
        None,
    );
    assert!(dry.contains("webhook-added"), "{dry}");

    // The validating webhook refuses labelled pods and configmaps, on create and on update,
    // with its own message; its object selector lets `checked` objects by.
    let error = server.kubectl_fails(&["run", "bad", "-n", "hooks", "--image=busybox", "--labels=deny=yes"], None);
    assert!(
        error.contains(
            r#"admission webhook "deny-labelled.hooks.example.com" denied the request: the object is labelled deny"#
        ),
        "{error}"
    );
    server.kubectl(&["run", "good", "-n", "hooks", "--image=busybox"], None);
    let error = server.kubectl_fails(&["label", "pod", "good", "-n", "hooks", "deny=yes"], None);
    assert!(error.contains("the object is labelled deny"), "{error}");
    server.kubectl(&["run", "exempt", "-n", "hooks", "--image=busybox", "--labels=deny=yes,checked=true"], None);
    server.kubectl(&["run", "bad", "-n", "quiet", "--image=busybox", "--labels=deny=yes"], None);

    // Webhooks never see their own configurations: a refusing webhook cannot lock them.
    server.kubectl(&["label", "validatingwebhookconfiguration", "deny-labelled", "deny=yes"], None);
    server.kubectl(&["delete", "mutatingwebhookconfiguration", "add-label"], None);
    wait_for("the mutating webhook to go", || {
        let name = format!("after-{}", unique());
        server.kubectl(&["create", "configmap", &name, "-n", "hooks"], None);
        label(&server, "hooks", &name).is_empty()
    });
}

#[test]
fn failure_policies_timeouts_and_invalid_configurations() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let webhook = Webhook::start();
    setup(&server, &webhook);
    let closed_port = tugboat_testkit::free_port();
    let configuration = |name: &str, policy: &str, url: &str, resource: &str, timeout: u32| {
        format!(
            r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: {name}}}
webhooks:
- name: {name}.hooks.example.com
  clientConfig: {{url: "{url}", caBundle: {ca}}}
  rules: [{{operations: ["*"], apiGroups: [""], apiVersions: [v1], resources: [{resource}]}}]
  namespaceSelector: {{matchLabels: {{webhooks: "on"}}}}
  failurePolicy: {policy}
  timeoutSeconds: {timeout}
  sideEffects: None
  admissionReviewVersions: [v1]
"#,
            ca = webhook.ca_bundle()
        )
    };
    let unreachable = format!("https://127.0.0.1:{closed_port}/nothing");
    server.kubectl(&["apply", "-f", "-"], Some(&configuration("fail-open", "Ignore", &unreachable, "secrets", 2)));
    server.kubectl(&["apply", "-f", "-"], Some(&configuration("fail-closed", "Fail", &unreachable, "services", 2)));
    let slow = format!("https://127.0.0.1:{}/slow", webhook.address.port());
    server.kubectl(&["apply", "-f", "-"], Some(&configuration("slow", "Fail", &slow, "serviceaccounts", 1)));

    // Fail closed: the call's failure is the answer.
    wait_for("the fail-closed webhook to take effect", || {
        let name = format!("svc-{}", unique());
        let output = server.kubectl_fails_or_not(&["create", "service", "clusterip", &name, "-n", "hooks", "--tcp=80"]);
        output.is_some_and(|error| error.contains(r#"failed calling webhook "fail-closed.hooks.example.com""#))
    });
    // Fail open: the same failure is ignored.
    server.kubectl(&["create", "secret", "generic", "open", "-n", "hooks", "--from-literal=a=b"], None);
    // A webhook slower than its timeout: refused, and the error says it timed out.
    let started = Instant::now();
    let error = server.kubectl_fails(&["create", "serviceaccount", "late", "-n", "hooks"], None);
    assert!(error.contains("context deadline exceeded"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "the timeout of one second holds");
    // Deleting goes through validating webhooks too (operations "*").
    let error = server.kubectl_fails(&["delete", "serviceaccount", "default", "-n", "hooks"], None);
    assert!(error.contains("slow.hooks.example.com"), "{error}");

    // Configurations are validated as upstream's, CEL conditions compiled.
    let invalid = configuration("bad", "Sometimes", "http://127.0.0.1/", "pods", 31).replace(
        "  sideEffects: None\n",
        "  sideEffects: None\n  matchConditions: [{name: c, expression: \"... [] bad expression\"}]\n",
    );
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&invalid));
    for expected in [
        r#"webhooks[0].failurePolicy: Unsupported value: "Sometimes""#,
        "webhooks[0].timeoutSeconds: Invalid value: 31: the timeout value must be between 1 and 30 seconds",
        r#"webhooks[0].clientConfig.url: Invalid value: "http": 'https' is the only allowed URL scheme"#,
        "webhooks[0].matchConditions[0].expression: Invalid value: \"... [] bad expression\": compilation failed",
    ] {
        assert!(error.contains(expected), "{expected}\nnot in\n{error}");
    }
    assert!(webhook.reviews() > 0);
}

trait KubectlMaybe {
    fn kubectl_fails_or_not(&self, args: &[&str]) -> Option<String> {
        self.kubectl_input_fails_or_not(args, None)
    }

    fn kubectl_input_fails_or_not(&self, args: &[&str], input: Option<&str>) -> Option<String>;
}

impl KubectlMaybe for TugboatServer {
    /// kubectl's stderr if it failed, None if it succeeded.
    fn kubectl_input_fails_or_not(&self, args: &[&str], input: Option<&str>) -> Option<String> {
        use std::io::Write;
        let mut child = std::process::Command::new("/usr/bin/kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.scratch("home"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(input.unwrap_or_default().as_bytes()).expect("kubectl reads its input");
        drop(stdin);
        let output = child.wait_with_output().expect("kubectl runs");
        (!output.status.success()).then(|| String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

const POLICY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: strict, labels: {env: strict}}
---
apiVersion: v1
kind: Namespace
metadata: {name: lax, labels: {env: lax}}
---
apiVersion: v1
kind: Namespace
metadata: {name: policies}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: limits, namespace: policies}
data: {forbidden: forbidden-name}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: replica-limit}
spec:
  paramKind: {apiVersion: v1, kind: ConfigMap}
  matchConstraints:
    resourceRules:
    - {operations: [CREATE, UPDATE], apiGroups: [apps], apiVersions: [v1], resources: [deployments]}
  variables:
  - {name: replicas, expression: "object.spec.replicas"}
  validations:
  - expression: "variables.replicas <= 5"
    messageExpression: "'at most 5 replicas, got ' + string(variables.replicas)"
  - expression: "object.metadata.name != params.data.forbidden"
    message: "this name is forbidden"
    reason: Forbidden
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: replica-limit-strict}
spec:
  policyName: replica-limit
  validationActions: [Deny]
  paramRef: {name: limits, namespace: policies, parameterNotFoundAction: Deny}
  matchResources:
    namespaceSelector: {matchLabels: {env: strict}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: replica-limit-lax}
spec:
  policyName: replica-limit
  validationActions: [Warn]
  paramRef: {name: limits, namespace: policies, parameterNotFoundAction: Deny}
  matchResources:
    namespaceSelector: {matchLabels: {env: lax}}
"#;

#[test]
fn a_cel_policy_refuses_a_deployment_with_too_many_replicas() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    server.kubectl(&["apply", "-f", "-"], Some(POLICY));
    let table = server.kubectl(&["get", "validatingadmissionpolicies"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "VALIDATIONS", "PARAMKIND", "AGE"]);
    assert!(table.contains("replica-limit   2             v1/ConfigMap"), "{table}");
    let bindings = server.kubectl(&["get", "validatingadmissionpolicybindings"], None);
    assert!(bindings.contains("replica-limit-strict   replica-limit   policies/limits"), "{bindings}");

    // Deny: the message expression says why, with the policy's and the binding's names (422).
    wait_for("the policy to take effect", || {
        let name = format!("big-{}", unique());
        server
            .kubectl_fails_or_not(&["create", "deployment", &name, "-n", "strict", "--image=busybox", "--replicas=10"])
            .is_some()
    });
    let error = server
        .kubectl_fails(&["create", "deployment", "big", "-n", "strict", "--image=busybox", "--replicas=10"], None);
    assert!(
        error.contains(
            "ValidatingAdmissionPolicy 'replica-limit' with binding 'replica-limit-strict' denied request: at most 5 replicas, got 10"
        ),
        "{error}"
    );
    server.kubectl(&["create", "deployment", "small", "-n", "strict", "--image=busybox", "--replicas=2"], None);
    let error = server
        .kubectl_fails(&["patch", "deployment", "small", "-n", "strict", "-p", r#"{"spec":{"replicas":8}}"#], None);
    assert!(error.contains("at most 5 replicas, got 8"), "updates are checked too: {error}");
    // The params object (a ConfigMap) is read per request; a validation's own reason (403).
    let error =
        server.kubectl_fails(&["create", "deployment", "forbidden-name", "-n", "strict", "--image=busybox"], None);
    assert!(error.contains("this name is forbidden"), "{error}");
    let deployment = r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"forbidden-name"},
        "spec":{"selector":{"matchLabels":{"a":"b"}},"template":{"metadata":{"labels":{"a":"b"}},
        "spec":{"containers":[{"name":"c","image":"busybox"}]}}}}"#;
    let (code, status) = server.curl(
        "POST",
        "/apis/apps/v1/namespaces/strict/deployments",
        true,
        &["-H", "Content-Type: application/json", "--data", deployment],
    );
    assert_eq!(code, 403, "{status}");
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["reason"], "Forbidden");
    // Warn: the same failure is a warning where the binding says so.
    let (_, warnings) = server
        .kubectl_with_stderr(&["create", "deployment", "big", "-n", "lax", "--image=busybox", "--replicas=10"], None);
    assert!(
        warnings.contains(
            "Validation failed for ValidatingAdmissionPolicy 'replica-limit' with binding 'replica-limit-lax': at most 5 replicas, got 10"
        ),
        "{warnings}"
    );
    // Params missing with parameterNotFoundAction Deny: refused.
    server.kubectl(&["delete", "configmap", "limits", "-n", "policies"], None);
    wait_for("the missing params to refuse", || {
        let name = format!("any-{}", unique());
        server
            .kubectl_fails_or_not(&["create", "deployment", &name, "-n", "strict", "--image=busybox"])
            .is_some_and(|error| error.contains("no params found"))
    });

    // Policies and bindings are validated: CEL compiled, actions checked.
    let error = server.kubectl_fails(
        &["apply", "-f", "-"],
        Some(&POLICY.split("---").nth(4).unwrap().replace("variables.replicas <= 5", "variables.replicas <=")),
    );
    assert!(
        error.contains("spec.validations[0].expression: Invalid value") && error.contains("compilation failed"),
        "{error}"
    );
    let error = server.kubectl_fails(
        &["apply", "-f", "-"],
        Some(&POLICY.split("---").nth(5).unwrap().replace("[Deny]", "[Deny, Warn]")),
    );
    assert!(error.contains("must not contain both Deny and Warn"), "{error}");
}

fn gadgets(webhook: &Webhook) -> String {
    format!(
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: gadgets.example.com}}
spec:
  group: example.com
  scope: Namespaced
  names: {{plural: gadgets, kind: Gadget}}
  conversion:
    strategy: Webhook
    webhook:
      conversionReviewVersions: [v1]
      clientConfig:
        service: {{namespace: hooks, name: hook, port: 8443, path: /convert}}
        caBundle: {ca}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
  - name: v2
    served: true
    storage: false
    selectableFields: [{{jsonPath: .spec.host}}]
    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"#,
        ca = webhook.ca_bundle()
    )
}

#[test]
fn a_conversion_webhook_converts_custom_objects_between_versions() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let webhook = Webhook::start();
    setup(&server, &webhook);
    server.kubectl(&["apply", "-f", "-"], Some(&gadgets(&webhook)));
    server.kubectl(&["wait", "--for=condition=Established", "crd/gadgets.example.com", "--timeout=30s"], None);
    let v1 = "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: old, namespace: hooks}\nspec: {hostPort: \"localhost:8080\"}\n";
    let v2 = "apiVersion: example.com/v2\nkind: Gadget\nmetadata: {name: new, namespace: hooks}\nspec: {host: example.com, port: \"443\"}\n";
    server.kubectl(&["apply", "-f", "-"], Some(v1));
    server.kubectl(&["apply", "-f", "-"], Some(v2));

    // Each version reads both objects, converted by the webhook (a list in one review).
    let read = |version: &str, name: &str| -> Value {
        let text = server
            .kubectl(&["get", &format!("gadgets.{version}.example.com"), name, "-n", "hooks", "-o", "json"], None);
        serde_json::from_str(&text).unwrap()
    };
    let old_v2 = read("v2", "old");
    assert_eq!(old_v2["apiVersion"], "example.com/v2");
    assert_eq!(old_v2["spec"], json!({"host": "localhost", "port": "8080"}));
    let new_v1 = read("v1", "new");
    assert_eq!(new_v1["spec"], json!({"hostPort": "example.com:443"}), "written in v2, stored in v1");
    assert_eq!(new_v1["metadata"]["uid"], read("v2", "new")["metadata"]["uid"]);
    let list =
        server.kubectl(&["get", "gadgets.v2.example.com", "-n", "hooks", "-o", "jsonpath={.items[*].spec.host}"], None);
    assert_eq!(list, "example.com localhost");
    let (code, events) =
        server.curl("GET", "/apis/example.com/v2/namespaces/hooks/gadgets?watch=1&timeoutSeconds=1", true, &[]);
    assert_eq!(code, 200);
    assert_eq!(events.matches(r#""host":"localhost""#).count(), 1, "{events}");

    // A version's selectable fields select by its own (converted) fields; others are refused.
    let selected = server.kubectl(
        &["get", "gadgets.v2.example.com", "-n", "hooks", "--field-selector=spec.host=localhost", "-o", "name"],
        None,
    );
    assert_eq!(selected.trim(), "gadget.example.com/old");
    let error = server
        .kubectl_fails(&["get", "gadgets.v1.example.com", "-n", "hooks", "--field-selector=spec.host=localhost"], None);
    assert!(error.contains("field label not supported: spec.host"), "{error}");

    // An update through v2 is stored in v1.
    server.kubectl(
        &["patch", "gadgets.v2.example.com", "old", "-n", "hooks", "--type=merge", "-p", r#"{"spec":{"port":"9090"}}"#],
        None,
    );
    assert_eq!(read("v1", "old")["spec"]["hostPort"], "localhost:9090");

    // The webhook's settings are validated as upstream's.
    let broken = gadgets(&webhook)
        .replace("      conversionReviewVersions: [v1]\n", "")
        .replace("gadgets.example.com", "gizmos.example.com")
        .replace("plural: gadgets, kind: Gadget", "plural: gizmos, kind: Gizmo");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&broken));
    assert!(
        error.contains(
            "spec.conversion.webhook.conversionReviewVersions: Required value: must include at least one of v1, v1beta1"
        ),
        "{error}"
    );
}

/// Webhooks and a policy whose rules name autoscaling/v1 HorizontalPodAutoscalers; the
/// `Exact` one refuses every review it gets.
fn hpa_v1_rules(webhook: &Webhook) -> String {
    format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: hpa-as-v1}}
webhooks:
- name: hpa-as-v1.hooks.example.com
  clientConfig: {{url: "https://127.0.0.1:{port}/hpa-as-v1", caBundle: {ca}}}
  rules: [{{operations: [CREATE], apiGroups: [autoscaling], apiVersions: [v1], resources: [horizontalpodautoscalers]}}]
  namespaceSelector: {{matchLabels: {{webhooks: "on"}}}}
  sideEffects: None
  admissionReviewVersions: [v1]
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: exact-v1}}
webhooks:
- name: exact-v1.hooks.example.com
  clientConfig: {{url: "https://127.0.0.1:{port}/refuse", caBundle: {ca}}}
  rules: [{{operations: [CREATE], apiGroups: [autoscaling], apiVersions: [v1], resources: [horizontalpodautoscalers]}}]
  matchPolicy: Exact
  objectSelector: {{matchLabels: {{exact: "checked"}}}}
  sideEffects: None
  admissionReviewVersions: [v1]
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: hpa-v1-limit}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules: [{{operations: [CREATE], apiGroups: [autoscaling], apiVersions: [v1], resources: [horizontalpodautoscalers]}}]
  validations:
  - expression: "object.apiVersion == 'autoscaling/v1' && has(object.spec.targetCPUUtilizationPercentage)"
    message: "not seen as v1"
  - expression: "object.spec.maxReplicas <= 10"
    messageExpression: "'at most 10 replicas as v1, got ' + string(object.spec.maxReplicas)"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: hpa-v1-limit}}
spec:
  policyName: hpa-v1-limit
  validationActions: [Deny]
  matchResources: {{namespaceSelector: {{matchLabels: {{webhooks: "on"}}}}}}
"#,
        port = webhook.address.port(),
        ca = webhook.ca_bundle()
    )
}

fn hpa_v2(name: &str, max: u32, labels: &str) -> String {
    format!(
        r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {{name: {name}, namespace: hooks, labels: {{{labels}}}}}
spec:
  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}
  minReplicas: 1
  maxReplicas: {max}
  metrics:
  - type: Resource
    resource: {{name: cpu, target: {{type: Utilization, averageUtilization: 80}}}}
"#
    )
}

#[test]
fn equivalent_versions_are_reviewed_in_the_version_the_rules_name() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let webhook = Webhook::start();
    setup(&server, &webhook);
    server.kubectl(&["apply", "-f", "-"], Some(&hpa_v1_rules(&webhook)));
    let stored = server.kubectl(
        &["get", "mutatingwebhookconfiguration", "hpa-as-v1", "-o", "jsonpath={.webhooks[0].matchPolicy}"],
        None,
    );
    assert_eq!(stored, "Equivalent", "upstream's default");
    let target = |name: &str| {
        server.kubectl(
            &[
                "get",
                "hpa.v2.autoscaling",
                name,
                "-n",
                "hooks",
                "-o",
                "jsonpath={.spec.metrics[0].resource.target.averageUtilization}",
            ],
            None,
        )
    };

    // An autoscaling/v2 create goes to the webhook (and the policy) as autoscaling/v1, with
    // requestKind v2; the webhook's patch of the v1 object lands in the stored v2 one.
    wait_for("the mutating webhook to take effect", || {
        let name = format!("probe-{}", unique());
        server.kubectl(&["apply", "-f", "-"], Some(&hpa_v2(&name, 5, "")));
        target(&name) == "42"
    });
    server.kubectl(&["apply", "-f", "-"], Some(&hpa_v2("web", 5, "")));
    assert_eq!(target("web"), "42");
    // The policy sees the v1 object too: its limit is a v1 field's.
    wait_for("the policy to take effect", || {
        let name = format!("big-{}", unique());
        server
            .kubectl_input_fails_or_not(&["apply", "-f", "-"], Some(&hpa_v2(&name, 20, "")))
            .is_some_and(|error| error.contains("at most 10 replicas as v1, got 20"))
    });
    // matchPolicy Exact: the v1 rule does not take a v2 request…
    server.kubectl(&["apply", "-f", "-"], Some(&hpa_v2("exact", 5, "exact: checked")));
    // …and takes a v1 one.
    let v1 = r#"{"apiVersion":"autoscaling/v1","kind":"HorizontalPodAutoscaler","metadata":{"name":"exact-v1","namespace":"hooks","labels":{"exact":"checked"}},
        "spec":{"scaleTargetRef":{"apiVersion":"apps/v1","kind":"Deployment","name":"web"},"maxReplicas":3,"targetCPUUtilizationPercentage":50}}"#;
    let error = server.kubectl_fails(&["create", "-f", "-"], Some(v1));
    assert!(
        error.contains(r#"admission webhook "exact-v1.hooks.example.com" denied the request: no handler for /refuse"#),
        "{error}"
    );
}

const TYPED_POLICIES: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: crontabs.stable.example.com}
spec:
  group: stable.example.com
  scope: Namespaced
  names: {plural: crontabs, singular: crontab, kind: CronTab}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              cronSpec: {type: string}
              replicas: {type: integer}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: correct}
spec:
  matchConstraints:
    resourceRules:
    - {operations: [CREATE], apiGroups: [apps], apiVersions: [v1], resources: [deployments]}
  variables:
  - {name: containers, expression: "object.spec.template.spec.containers"}
  validations:
  - expression: "object.spec.replicas > 1 && variables.containers.all(c, c.image.contains(':'))"
    messageExpression: "'wants replicas > 1, got ' + string(object.spec.replicas)"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: confused}
spec:
  matchConstraints:
    resourceRules:
    - {operations: [CREATE], apiGroups: [apps], apiVersions: [v1], resources: [deployments]}
  validations:
  - expression: "object.spec.replicas > '1'"
    messageExpression: "'wants replicas > 1, got ' + object.spec.replicas"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: crontabs}
spec:
  matchConstraints:
    resourceRules:
    - {operations: [CREATE], apiGroups: [stable.example.com], apiVersions: [v1], resources: [crontabs]}
  validations:
  - expression: "object.spec.replicas > '1'"
  - expression: "object.spec.maxRetries < 10"
  - expression: "object.spec.cronSpec.startsWith('*') && object.metadata.name != ''"
"#;

/// Upstream's "should type check validation expressions" and "should type check a CRD"
/// (test/e2e/apimachinery/validatingadmissionpolicy.go), with kubectl; and the cost limit.
#[test]
fn policies_are_type_checked_and_their_expressions_cost_limited() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let (definition, policies) = TYPED_POLICIES.split_once("---").unwrap();
    server.kubectl(&["apply", "-f", "-"], Some(definition));
    server.kubectl(&["wait", "--for=condition=Established", "crd/crontabs.stable.example.com"], None);
    server.kubectl(&["apply", "-f", "-"], Some(policies));
    let status = |name: &str| -> Value {
        let policy = server.kubectl(&["get", "validatingadmissionpolicy", name, "-o", "json"], None);
        serde_json::from_str::<Value>(&policy).unwrap()["status"].clone()
    };
    let correct = status("correct");
    assert_eq!(correct["typeChecking"], json!({}), "{correct}");
    assert_eq!(correct["observedGeneration"], 1);

    let warnings = status("confused")["typeChecking"]["expressionWarnings"].clone();
    assert_eq!(warnings.as_array().map(Vec::len), Some(2), "{warnings}");
    assert_eq!(warnings[0]["fieldRef"], "spec.validations[0].expression");
    assert_eq!(
        warnings[0]["warning"],
        "apps/v1, Kind=Deployment: ERROR: <input>:1:22: found no matching overload for '_>_' applied to '(int, string)'\n | object.spec.replicas > '1'\n | .....................^\n"
    );
    assert_eq!(warnings[1]["fieldRef"], "spec.validations[0].messageExpression");
    let warning = warnings[1]["warning"].as_str().unwrap();
    assert!(warning.contains("found no matching overload for '_+_' applied to '(string, int)'"), "{warning}");

    let warnings = status("crontabs")["typeChecking"]["expressionWarnings"].clone();
    assert_eq!(warnings.as_array().map(Vec::len), Some(2), "{warnings}");
    assert_eq!(warnings[0]["fieldRef"], "spec.validations[0].expression");
    assert_eq!(warnings[1]["fieldRef"], "spec.validations[1].expression");
    let warning = warnings[1]["warning"].as_str().unwrap();
    assert!(
        warning.starts_with("stable.example.com/v1, Kind=CronTab: ") && warning.contains("undefined field 'maxRetries'"),
        "{warning}"
    );
    // A change of the spec is checked again (a new generation).
    let fixed = policies.split("---").nth(1).unwrap().replace("> '1'", "> 1").replace("+ object.spec.replicas", "+ 'x'");
    server.kubectl(&["apply", "-f", "-"], Some(&fixed));
    let status = status("confused");
    assert_eq!((status["observedGeneration"].clone(), status["typeChecking"].clone()), (json!(2), json!({})));

    // An expression whose cost is over the per-call limit refuses (failurePolicy Fail).
    let quadratic = r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: quadratic}
spec:
  matchConstraints:
    resourceRules:
    - {operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [configmaps]}
  validations:
  - expression: "!has(object.data) || object.data.all(k, object.data.all(j, k == j || k != j))"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: quadratic}
spec:
  policyName: quadratic
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {matchLabels: {costly: "yes"}}
"#;
    server.kubectl(&["create", "namespace", "costly"], None);
    server.kubectl(&["label", "namespace", "costly", "costly=yes"], None);
    server.kubectl(&["apply", "-f", "-"], Some(quadratic));
    let few: Vec<String> = (0..10).map(|i| format!("--from-literal=k{i}=v")).collect();
    let many: Vec<String> = (0..500).map(|i| format!("--from-literal=k{i}=v")).collect();
    let create = |name: &str, literals: &[String]| {
        let mut args = vec!["create", "configmap", name, "-n", "costly"];
        args.extend(literals.iter().map(String::as_str));
        server.kubectl_fails_or_not(&args)
    };
    wait_for("the binding to take effect", || create(&format!("many-{}", unique()), &many).is_some());
    let error = create("many", &many).expect("refused");
    assert!(
        error.contains("ValidatingAdmissionPolicy 'quadratic' with binding 'quadratic' denied request")
            && error.contains("operation cancelled: actual cost limit exceeded"),
        "{error}"
    );
    assert_eq!(create("few", &few), None, "ten keys cost little");
}
