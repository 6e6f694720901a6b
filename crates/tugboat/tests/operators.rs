//! An operator written with kube-rs, unchanged from how its users write one (`CustomResource`
//! derive, `kube::runtime::Controller` with `owns`, the `finalizer` helper, status patches by
//! server-side apply), runs against a real `tugboat server`; the real kubectl makes and changes
//! its objects and shows them with their printer columns.
//!
//! The operator: a `Greeting` (tugboat.test/v1) gets a ConfigMap holding its message, owned by
//! it; its status says which ConfigMap and the generation it reflects. Deleting a Greeting runs
//! the operator's cleanup (it records it in a ConfigMap of its own) before the Greeting goes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams, ResourceExt};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResource, CustomResourceExt, Resource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tugboat_testkit::{TugboatServer, eventually};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
#[kube(group = "tugboat.test", version = "v1", kind = "Greeting", namespaced, status = "GreetingStatus")]
#[kube(shortname = "gr", category = "all")]
#[kube(printcolumn = r#"{"name":"Message","type":"string","jsonPath":".spec.message"}"#)]
#[kube(printcolumn = r#"{"name":"ConfigMap","type":"string","jsonPath":".status.configMap"}"#)]
pub struct GreetingSpec {
    message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    times: Option<u32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GreetingStatus {
    config_map: String,
    observed_generation: i64,
}

const FINALIZER: &str = "greetings.tugboat.test/cleanup";
const MANAGER: &str = "greeter";

#[derive(Debug)]
enum Error {
    Finalizer(Box<kube::runtime::finalizer::Error<kube::Error>>),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Finalizer(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for Error {}

struct Context {
    client: Client,
}

async fn reconcile(greeting: Arc<Greeting>, context: Arc<Context>) -> Result<Action, Error> {
    let namespace = greeting.namespace().unwrap_or_default();
    let greetings: Api<Greeting> = Api::namespaced(context.client.clone(), &namespace);
    finalizer(&greetings, FINALIZER, greeting, |event| async {
        match event {
            Event::Apply(greeting) => apply(&greeting, &context.client).await,
            Event::Cleanup(greeting) => cleanup(&greeting, &context.client).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply(greeting: &Greeting, client: &Client) -> Result<Action, kube::Error> {
    let namespace = greeting.namespace().unwrap_or_default();
    let name = format!("greeting-{}", greeting.name_any());
    let owner = greeting.controller_owner_ref(&()).expect("a stored object has a uid");
    let message = greeting.spec.message.repeat(greeting.spec.times.unwrap_or(1) as usize);
    let config_map = ConfigMap {
        metadata: ObjectMeta { name: Some(name.clone()), owner_references: Some(vec![owner]), ..Default::default() },
        data: Some([("message".to_string(), message)].into()),
        ..Default::default()
    };
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    config_maps.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&config_map)).await?;
    let status = serde_json::json!({
        "apiVersion": "tugboat.test/v1",
        "kind": "Greeting",
        "status": GreetingStatus { config_map: name, observed_generation: greeting.metadata.generation.unwrap_or(0) },
    });
    let greetings: Api<Greeting> = Api::namespaced(client.clone(), &namespace);
    greetings.patch_status(&greeting.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&status)).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Records that the cleanup ran (the owned ConfigMap goes by garbage collection).
async fn cleanup(greeting: &Greeting, client: &Client) -> Result<Action, kube::Error> {
    let namespace = greeting.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let record = ConfigMap {
        metadata: ObjectMeta { name: Some(format!("farewell-{}", greeting.name_any())), ..Default::default() },
        data: Some([("said".to_string(), greeting.spec.message.clone())].into()),
        ..Default::default()
    };
    match config_maps.create(&PostParams::default(), &record).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error),
    }
    Ok(Action::await_change())
}

fn error_policy(_: Arc<Greeting>, error: &Error, _: Arc<Context>) -> Action {
    eprintln!("reconcile failed: {error}");
    Action::requeue(Duration::from_millis(200))
}

async fn client_of(server: &TugboatServer) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig()).expect("the kubeconfig reads");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("a config");
    Client::try_from(config).expect("a client")
}

#[test]
fn a_kube_rs_operator_reconciles_its_custom_resources() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();

    // The operator installs its definition and waits until it is established, as operators do.
    let client = runtime.block_on(client_of(&server));
    runtime.block_on(async {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.patch("greetings.tugboat.test", &PatchParams::apply(MANAGER).force(), &Patch::Apply(Greeting::crd()))
            .await
            .expect("the definition is applied");
        let established = await_condition(crds, "greetings.tugboat.test", conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(10), established)
            .await
            .expect("established in time")
            .expect("the wait works");
    });
    let controller = {
        let greetings: Api<Greeting> = Api::all(client.clone());
        let config_maps: Api<ConfigMap> = Api::all(client.clone());
        let context = Arc::new(Context { client: client.clone() });
        runtime.spawn(
            Controller::new(greetings, Default::default())
                .owns(config_maps, Default::default())
                .run(reconcile, error_policy, context)
                .for_each(|_| futures::future::ready(())),
        )
    };

    server.kubectl(&["create", "namespace", "greet"], None);
    let greeting = "apiVersion: tugboat.test/v1\nkind: Greeting\nmetadata:\n  name: hello\n  namespace: greet\nspec:\n  message: hi\n";
    server.kubectl(&["apply", "-f", "-"], Some(greeting));

    // Reconciled: the owned ConfigMap, the finalizer, the status (by the operator's apply).
    eventually("the greeting's ConfigMap holds its message", || {
        server.kubectl_ok(&["get", "configmap", "greeting-hello", "-n", "greet", "-o", "jsonpath={.data.message}"])
            == Some("hi".to_string())
    });
    eventually("the status names the ConfigMap", || {
        server.kubectl_ok(&["get", "greeting", "hello", "-n", "greet", "-o", "jsonpath={.status.configMap}"])
            == Some("greeting-hello".to_string())
    });
    let owner = server.kubectl(
        &[
            "get",
            "configmap",
            "greeting-hello",
            "-n",
            "greet",
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
        ],
        None,
    );
    assert_eq!(owner, "Greeting/hello");
    let finalizers =
        server.kubectl(&["get", "gr", "hello", "-n", "greet", "-o", "jsonpath={.metadata.finalizers}"], None);
    assert!(finalizers.contains(FINALIZER), "{finalizers}");
    let managers = server.kubectl(
        &[
            "get",
            "greeting",
            "hello",
            "-n",
            "greet",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
        None,
    );
    let all = server.kubectl(&["get", "greeting", "hello", "-n", "greet", "--show-managed-fields", "-o", "yaml"], None);
    assert!(managers.contains(MANAGER) && managers.contains("kubectl"), "{managers}\n{all}");

    // kubectl shows it with the printer columns the derive declared.
    let table = server.kubectl(&["get", "greetings", "-n", "greet"], None);
    let lines: Vec<&str> = table.lines().collect();
    // Upstream adds an AGE column only to definitions that declare no column.
    assert!(lines[0].split_whitespace().eq(["NAME", "MESSAGE", "CONFIGMAP"]), "{table}");
    assert!(lines[1].starts_with("hello") && lines[1].contains("greeting-hello"), "{table}");
    assert!(server.kubectl(&["get", "all", "-n", "greet"], None).contains("greeting.tugboat.test/hello"));

    // A change of the spec is reconciled (the watch through the controller's reflector).
    server
        .kubectl(&["patch", "greeting", "hello", "-n", "greet", "--type=merge", "-p", r#"{"spec":{"times":3}}"#], None);
    eventually("the ConfigMap follows the spec", || {
        server.kubectl_ok(&["get", "configmap", "greeting-hello", "-n", "greet", "-o", "jsonpath={.data.message}"])
            == Some("hihihi".to_string())
    });
    eventually("the status reflects generation 2", || {
        server.kubectl_ok(&["get", "greeting", "hello", "-n", "greet", "-o", "jsonpath={.status.observedGeneration}"])
            == Some("2".to_string())
    });
    // The owned ConfigMap changed behind the operator's back is put right (`owns`).
    server.kubectl(
        &["patch", "configmap", "greeting-hello", "-n", "greet", "--type=merge", "-p", r#"{"data":{"message":"x"}}"#],
        None,
    );
    eventually("the owned ConfigMap is reconciled back", || {
        server.kubectl_ok(&["get", "configmap", "greeting-hello", "-n", "greet", "-o", "jsonpath={.data.message}"])
            == Some("hihihi".to_string())
    });

    // Deleting: the operator's cleanup runs, the finalizer is removed, the greeting goes, and its
    // ConfigMap is collected as its owner's dependent.
    server.kubectl(&["delete", "greeting", "hello", "-n", "greet", "--timeout=30s"], None);
    assert_eq!(
        server.kubectl(&["get", "configmap", "farewell-hello", "-n", "greet", "-o", "jsonpath={.data.said}"], None),
        "hi"
    );
    assert!(server.kubectl_fails(&["get", "greeting", "hello", "-n", "greet"], None).contains("NotFound"));
    eventually("the owned ConfigMap is collected", || {
        server.kubectl_ok(&["get", "configmap", "greeting-hello", "-n", "greet"]).is_none()
    });

    controller.abort();
}

const NOTES: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: notes.tugboat.test
spec:
  group: tugboat.test
  scope: Namespaced
  names: {plural: notes, singular: note, kind: Note}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Author, type: string, jsonPath: .spec.author}
    - {name: Words, type: integer, jsonPath: .status.count.words}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              text: {type: string}
              author: {type: string}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"#;

/// The kopf operator of `tests/python/kopf_operator.py`, killed with the test.
struct Kopf(std::process::Child);

impl Drop for Kopf {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// kopf (Python; from PyPI into the venv `scripts/test` makes, TUGBOAT_PYTHON names its
/// interpreter): its own admission webhooks (self-signed CA), handlers, status, finalizer.
#[test]
fn a_kopf_operator_admits_and_reconciles_its_custom_resources() {
    let python = std::env::var("TUGBOAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_kopf =
        std::process::Command::new(&python).args(["-c", "import kopf, kubernetes"]).status().is_ok_and(|s| s.success());
    assert!(has_kopf, "{python} has no `kopf` module: run scripts/test, which installs it");
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    server.kubectl(&["apply", "-f", "-"], Some(NOTES));
    server.kubectl(&["wait", "--for=condition=Established", "crd/notes.tugboat.test"], None);
    server.kubectl(&["create", "namespace", "notes"], None);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/kopf_operator.py");
    let log = server.scratch("kopf").join("out.log");
    let err = server.scratch("kopf").join("err.log");
    let _kopf = Kopf(
        std::process::Command::new(&python)
            .args(["-m", "kopf", "run", "--standalone", "--all-namespaces", "--verbose"])
            .arg(&script)
            .env("KUBECONFIG", server.kubeconfig())
            .env("KOPF_WEBHOOK_PORT", tugboat_testkit::free_port().to_string())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("kopf runs"),
    );
    let kopf_log =
        || std::fs::read_to_string(&log).unwrap_or_default() + &std::fs::read_to_string(&err).unwrap_or_default();
    // kopf registers its webhooks itself, with its certificate as the CA bundle.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let registered = server.kubectl_ok(&[
            "get",
            "validatingwebhookconfiguration",
            "notes.tugboat.test",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ]);
        if registered.is_some_and(|ca| !ca.is_empty())
            && server.kubectl_ok(&["get", "mutatingwebhookconfiguration", "notes.tugboat.test"]).is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "kopf registered no webhooks:\n{}", kopf_log());
        std::thread::sleep(Duration::from_millis(200));
    }

    // Refused by kopf's validating webhook, with its message.
    let refused = server.kubectl_fails(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: tugboat.test/v1\nkind: Note\nmetadata: {name: empty, namespace: notes}\nspec: {text: \"\"}\n",
        ),
    );
    assert!(refused.contains("a note needs text"), "{refused}\n{}", kopf_log());

    // Defaulted by its mutating webhook, then counted by its creation handler into the status.
    server.kubectl(
        &["apply", "-f", "-"],
        Some("apiVersion: tugboat.test/v1\nkind: Note\nmetadata: {name: hello, namespace: notes}\nspec: {text: hello there world}\n"),
    );
    assert_eq!(server.kubectl(&["get", "note", "hello", "-n", "notes", "-o", "jsonpath={.spec.author}"], None), "kopf");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.kubectl(&["get", "note", "hello", "-n", "notes", "-o", "jsonpath={.status.count.words}"], None) != "3"
    {
        assert!(Instant::now() < deadline, "kopf did not handle the note:\n{}", kopf_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let table = server.kubectl(&["get", "notes", "-n", "notes"], None);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].split_whitespace().eq(["NAME", "AUTHOR", "WORDS"]), "{table}");
    assert!(lines[1].split_whitespace().eq(["hello", "kopf", "3"]), "{table}");
    let finalizers =
        server.kubectl(&["get", "note", "hello", "-n", "notes", "-o", "jsonpath={.metadata.finalizers}"], None);
    assert!(finalizers.contains("kopf.zalando.org/KopfFinalizerMarker"), "{finalizers}");

    // Deleting runs its deletion handler before the note goes.
    server.kubectl(&["delete", "note", "hello", "-n", "notes", "--timeout=30s"], None);
    assert_eq!(
        server.kubectl(&["get", "configmap", "deleted-hello", "-n", "notes", "-o", "jsonpath={.data.text}"], None),
        "hello there world"
    );
    let log = kopf_log();
    assert!(!log.contains("Traceback"), "{log}");
}
