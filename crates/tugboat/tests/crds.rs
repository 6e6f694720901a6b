//! CustomResourceDefinitions with the real kubectl against a real `tugboat server`: a definition
//! becomes a served resource (discovery, short names, categories, printer columns), its schema
//! prunes, defaults and validates objects, the status subresource splits writes, `/scale` maps
//! to the paths the definition names, values an update leaves as they were are not judged again
//! by a schema tightened since (ratcheting), a resource named like a built-in one (`pods` of
//! `example.com`) meets none of the built-in kind's rules, a second
//! version serves the same objects, CEL rules run within upstream's runtime cost budget,
//! deleting the definition deletes its objects first, and an autoscaler scales a custom
//! resource through its `/scale`.

use std::path::Path;

use tugboat_testkit::{TugboatServer, eventually};

fn server() -> TugboatServer {
    TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts")
}

const WIDGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    kind: Widget
    shortNames: [wg]
    categories: [all]
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    additionalPrinterColumns:
    - name: Size
      type: integer
      jsonPath: .spec.size
    - name: Color
      type: string
      jsonPath: .spec.color
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 10}
              color: {type: string, enum: [red, blue], default: red}
              replicas: {type: integer}
          status:
            type: object
            properties:
              ready: {type: boolean}
              replicas: {type: integer}
  - name: v1beta1
    served: true
    storage: false
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#;

const WIDGET: &str = r#"
apiVersion: example.com/v1
kind: Widget
metadata:
  name: small
spec:
  size: 3
"#;

#[test]
fn a_definition_serves_a_resource_that_kubectl_uses_like_a_built_in_one() {
    let server = server();
    server.kubectl(&["apply", "-f", "-"], Some(WIDGETS));
    server.kubectl(&["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=30s"], None);
    let crd = server.kubectl(&["get", "crd", "widgets.example.com", "-o", "json"], None);
    let crd: serde_json::Value = serde_json::from_str(&crd).unwrap();
    assert_eq!(crd["status"]["acceptedNames"]["singular"], "widget");
    assert_eq!(crd["status"]["storedVersions"], serde_json::json!(["v1"]));
    assert_eq!(crd["metadata"]["finalizers"][0], "customresourcecleanup.apiextensions.k8s.io");
    let resources = server.kubectl(&["api-resources", "--api-group=example.com"], None);
    assert!(resources.contains("widgets") && resources.contains("wg"), "{resources}");

    // Created, defaulted, shown with its printer columns under its short name and in `all`.
    server.kubectl(&["apply", "-f", "-"], Some(WIDGET));
    let table = server.kubectl(&["get", "wg"], None);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "SIZE", "COLOR"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row, ["small", "3", "red"]);
    assert!(server.kubectl(&["get", "all"], None).contains("widget.example.com/small"));

    // The schema refuses what it does not allow, naming the field.
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&WIDGET.replace("size: 3", "size: 30")));
    assert!(
        error.contains("spec.size: Invalid value: 30: spec.size in body should be less than or equal to 10"),
        "{error}"
    );
    let error =
        server.kubectl_fails(&["apply", "-f", "-"], Some(&WIDGET.replace("size: 3", "size: 3\n  shape: round")));
    assert!(error.contains(r#"unknown field "spec.shape""#), "{error}");
    let error = server.kubectl_fails(&["patch", "wg", "small", "-p", r#"{"spec":{"color":"green"}}"#], None);
    assert!(error.contains("application/merge-patch+json"), "a strategic merge patch is refused: {error}");

    // Spec and status are written apart; generation follows the spec.
    server.kubectl(
        &["patch", "wg", "small", "--type=merge", "-p", r#"{"spec":{"size":4},"status":{"ready":true}}"#],
        None,
    );
    let object = server.kubectl(&["get", "wg", "small", "-o", "json"], None);
    let object: serde_json::Value = serde_json::from_str(&object).unwrap();
    assert_eq!(object["spec"]["size"], 4);
    assert!(object["status"].is_null(), "the main resource does not write status: {object}");
    assert_eq!(object["metadata"]["generation"], 2);
    server.kubectl(
        &["patch", "wg", "small", "--subresource=status", "--type=merge", "-p", r#"{"status":{"ready":true}}"#],
        None,
    );
    assert_eq!(
        server.kubectl(&["get", "wg", "small", "-o", "jsonpath={.status.ready} {.metadata.generation}"], None),
        "true 2"
    );

    // The scale subresource maps to the paths the definition names: `kubectl scale` works.
    server.kubectl(&["scale", "wg", "small", "--replicas=5"], None);
    assert_eq!(server.kubectl(&["get", "wg", "small", "-o", "jsonpath={.spec.replicas}"], None), "5");
    let (code, scale) = server.curl("GET", "/apis/example.com/v1/namespaces/default/widgets/small/scale", true, &[]);
    assert_eq!(code, 200);
    let scale: serde_json::Value = serde_json::from_str(&scale).unwrap();
    assert_eq!((scale["kind"].as_str(), scale["spec"]["replicas"].as_i64()), (Some("Scale"), Some(5)));

    // A default added to the schema later applies to stored objects as they are read.
    let shape = r#"[{"op":"add","path":"/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/shape","value":{"type":"string","default":"square"}}]"#;
    server.kubectl(&["patch", "crd", "widgets.example.com", "--type=json", "-p", shape], None);
    assert_eq!(server.kubectl(&["get", "wg", "small", "-o", "jsonpath={.spec.shape}"], None), "square");

    // Another served version reads the same object, in its own apiVersion.
    let beta = server
        .kubectl(&["get", "widgets.v1beta1.example.com", "small", "-o", "jsonpath={.apiVersion} {.spec.size}"], None);
    assert_eq!(beta, "example.com/v1beta1 4");

    // The schema is published: `kubectl explain` reads it (OpenAPI v3), and OpenAPI v2 names it
    // as upstream does.
    let explained = server.kubectl(&["explain", "wg.spec"], None);
    assert!(explained.contains("KIND:       Widget") && explained.contains("size\t<integer>"), "{explained}");
    // kubectl's OpenAPI v2 explain reads the protobuf document, which has the custom kinds too.
    let explained = server.kubectl(&["explain", "wg.spec", "--output=plaintext-openapiv2"], None);
    assert!(explained.contains("Widget") && explained.contains("size") && explained.contains("<integer>"), "{explained}");
    let (code, swagger) = server.curl("GET", "/openapi/v2", true, &[]);
    assert_eq!(code, 200);
    let swagger: serde_json::Value = serde_json::from_str(&swagger).unwrap();
    let published = &swagger["definitions"]["com.example.v1.Widget"];
    assert_eq!(published["properties"]["spec"]["properties"]["size"]["maximum"], 10, "{published}");

    // Server-side apply and watch work as for built-in kinds.
    server.kubectl(&["apply", "--server-side", "-f", "-"], Some(&WIDGET.replace("small", "applied")));
    let (code, events) =
        server.curl("GET", "/apis/example.com/v1/namespaces/default/widgets?watch=1&timeoutSeconds=1", true, &[]);
    assert_eq!(code, 200);
    assert_eq!(events.lines().filter(|l| l.contains(r#""type":"ADDED""#)).count(), 2, "{events}");
}

#[test]
fn deleting_a_definition_deletes_its_objects_first() {
    let server = server();
    server.kubectl(&["apply", "-f", "-"], Some(WIDGETS));
    server.kubectl(&["wait", "--for=condition=Established", "crd/widgets.example.com", "--timeout=30s"], None);
    server.kubectl(&["apply", "-f", "-"], Some(WIDGET));
    let held = WIDGET.replace("small", "held").replace("metadata:\n", "metadata:\n  finalizers: [example.com/hold]\n");
    server.kubectl(&["apply", "-f", "-"], Some(&held));

    // Each served version has a local APIService, as upstream's crdregistration makes them.
    eventually("the definition's APIServices", || {
        let table = server.kubectl(&["get", "apiservices", "-o", "wide"], None);
        ["v1.example.com ", "v1beta1.example.com "]
            .iter()
            .all(|name| table.lines().any(|l| l.starts_with(name) && l.contains("Local") && l.contains("True")))
    });
    let labels =
        server.kubectl(&["get", "apiservice", "v1.example.com", "-o", "jsonpath={.metadata.labels}{.spec}"], None);
    assert!(
        labels.contains(r#""kube-aggregator.kubernetes.io/automanaged":"true""#)
            && labels.contains(r#""groupPriorityMinimum":1000"#),
        "{labels}"
    );

    server.kubectl(&["delete", "crd", "widgets.example.com", "--wait=false"], None);
    // The object without a finalizer goes; the definition waits for the held one.
    eventually("the free widget to go", || {
        !server.kubectl(&["get", "wg", "-o", "name"], None).contains("widget.example.com/small")
    });
    let crd =
        server.kubectl(&["get", "crd", "widgets.example.com", "-o", "jsonpath={.metadata.deletionTimestamp}"], None);
    assert!(!crd.is_empty(), "the definition is terminating");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&WIDGET.replace("small", "late")));
    assert!(error.contains("terminating"), "no new objects while terminating: {error}");

    server.kubectl(&["patch", "wg", "held", "--type=merge", "-p", r#"{"metadata":{"finalizers":null}}"#], None);
    eventually("the definition to go", || server.kubectl(&["get", "crd", "-o", "name"], None).trim().is_empty());
    eventually("the resource to leave discovery", || !server.kubectl(&["api-resources"], None).contains("widgets"));
    eventually("the APIServices to go", || !server.kubectl(&["get", "apiservices"], None).contains("example.com"));
    let error = server.kubectl_fails(&["get", "widgets"], None);
    assert!(error.contains("the server doesn't have a resource type"), "{error}");
}

#[test]
fn definitions_with_bad_names_or_versions_are_refused_with_the_field() {
    let server = server();
    let bad = WIDGETS.replace("name: widgets.example.com", "name: gadgets.example.com");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&bad));
    assert!(
        error.contains(
            r#"metadata.name: Invalid value: "gadgets.example.com": must be spec.names.plural+"."+spec.group"#
        ),
        "{error}"
    );
    let two_storage = WIDGETS.replace("storage: false", "storage: true");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&two_storage));
    assert!(error.contains("must have exactly one version marked as storage version"), "{error}");
}

const RULED: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: pools.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: pools, kind: Pool}
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
            x-kubernetes-validations:
            - rule: "self.replicas <= self.maxReplicas"
              messageExpression: "'replicas (' + string(self.replicas) + ') must not exceed maxReplicas'"
            properties:
              replicas: {type: integer}
              maxReplicas: {type: integer}
              mode:
                type: string
                x-kubernetes-validations:
                - {rule: "self == oldSelf", message: "mode is immutable"}
"#;

#[test]
fn cel_rules_in_a_schema_refuse_what_they_do_not_allow() {
    let server = server();
    server.kubectl(&["apply", "-f", "-"], Some(RULED));
    server.kubectl(&["wait", "--for=condition=Established", "crd/pools.example.com", "--timeout=30s"], None);
    let pool = |replicas: u32, mode: &str| {
        format!(
            "apiVersion: example.com/v1\nkind: Pool\nmetadata: {{name: p}}\nspec: {{replicas: {replicas}, maxReplicas: 3, mode: {mode}}}\n"
        )
    };
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&pool(5, "fast")));
    assert!(error.contains(r#"spec: Invalid value: "object": replicas (5) must not exceed maxReplicas"#), "{error}");
    server.kubectl(&["apply", "-f", "-"], Some(&pool(2, "fast")));
    // A transition rule compares with the object before the update.
    server.kubectl(&["apply", "-f", "-"], Some(&pool(3, "fast")));
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&pool(3, "slow")));
    assert!(error.contains(r#"spec.mode: Invalid value: "string": mode is immutable"#), "{error}");

    // A rule that does not compile keeps the definition out.
    let broken = RULED.replace("pools", "tanks").replace("Pool", "Tank").replace("self == oldSelf", "self ==");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&broken));
    assert!(
        error.contains(
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[mode].x-kubernetes-validations[0].rule"
        ) && error.contains("compilation failed"),
        "{error}"
    );
    // A rule too dear for its schema's bounds keeps the definition out, with upstream's
    // words; bounding the list and its strings lets it in.
    let dear = RULED.replace("pools", "lakes").replace("Pool", "Lake").replace(
        "              mode:\n",
        "              names:\n                type: array\n                items: {type: string}\n                x-kubernetes-validations:\n                - rule: \"self.all(n, n.matches('^[a-z]+$'))\"\n              mode:\n",
    );
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&dear));
    assert!(
        error.contains("spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[names].x-kubernetes-validations[0].rule: Forbidden: estimated rule cost exceeds budget by factor of more than 100x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"),
        "{error}"
    );
    let bounded = dear
        .replace("type: array\n", "type: array\n                maxItems: 20\n")
        .replace("items: {type: string}", "items: {type: string, maxLength: 63}");
    server.kubectl(&["apply", "-f", "-"], Some(&bounded));
}

/// Gadgets: a loose schema first, a tight one after.
const GADGETS: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: gadgets, kind: Gadget}
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
              label: {type: string}
              size: {type: integer}
              color: {type: string}
              ports:
                type: array
                x-kubernetes-list-type: map
                x-kubernetes-list-map-keys: [name]
                items:
                  type: object
                  required: [name]
                  properties:
                    name: {type: string}
                    port: {type: integer}
"#;

#[test]
fn tightening_a_schema_does_not_lock_the_objects_it_already_holds() {
    let server = server();
    server.kubectl(&["apply", "-f", "-"], Some(GADGETS));
    server.kubectl(&["wait", "--for=condition=Established", "crd/gadgets.example.com", "--timeout=30s"], None);
    let gadget = |label: &str, size: u32, color: &str, port: u32| {
        format!(
            "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {{name: g}}\nspec: {{label: {label}, size: {size}, color: {color}, ports: [{{name: web, port: {port}}}]}}\n"
        )
    };
    server.kubectl(&["apply", "-f", "-"], Some(&gadget("a-rather-long-label", 500, "red", 99999)));
    // The schema tightens: a short label, a CEL rule on size, ports under 65536.
    let tight = GADGETS
        .replace("label: {type: string}", "label: {type: string, maxLength: 10}")
        .replace(
            "size: {type: integer}",
            "size:\n                type: integer\n                x-kubernetes-validations:\n                - rule: \"self < 100\"\n                  message: size must be under 100",
        )
        .replace("port: {type: integer}", "port: {type: integer, maximum: 65535}");
    server.kubectl(&["apply", "-f", "-"], Some(&tight));
    eventually("the tight schema to be served", || {
        let fresh = gadget("a-rather-long-label", 500, "red", 99999).replace("name: g}", "name: h}");
        server.kubectl_fails(&["apply", "-f", "-"], Some(&fresh)).contains("spec.label: Too long")
    });
    // Values the update leaves as they were are not judged again (upstream's ratcheting)...
    server.kubectl(&["apply", "-f", "-"], Some(&gadget("a-rather-long-label", 500, "blue", 99999)));
    // ...and each one that changes is, schema and CEL rule alike, at its own path.
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&gadget("another-long-label", 500, "blue", 99999)));
    assert!(error.contains("spec.label: Too long: may not be more than 10 bytes"), "{error}");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&gadget("a-rather-long-label", 600, "blue", 99999)));
    assert!(error.contains(r#"spec.size: Invalid value: "integer": size must be under 100"#), "{error}");
    assert!(!error.contains("spec.label"), "{error}");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&gadget("a-rather-long-label", 500, "blue", 70000)));
    assert!(error.contains("spec.ports[0].port: Invalid value: 70000"), "{error}");
    server.kubectl(&["apply", "-f", "-"], Some(&gadget("short", 50, "blue", 8080)));
}

/// A definition for `<plural>.example.com` (kind `kind`) whose objects keep whatever they hold.
fn look_alike(plural: &str, kind: &str, scope: &str) -> String {
    format!(
        "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.example.com}}
spec:
  group: example.com
  scope: {scope}
  names: {{plural: {plural}, kind: {kind}}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
"
    )
}

#[test]
fn a_custom_resource_named_like_a_built_in_one_meets_none_of_its_rules() {
    let server = server();
    for (plural, kind, scope) in
        [("pods", "Pod", "Namespaced"), ("services", "Service", "Namespaced"), ("namespaces", "Namespace", "Cluster")]
    {
        server.kubectl(&["apply", "-f", "-"], Some(&look_alike(plural, kind, scope)));
        server.kubectl(
            &["wait", "--for=condition=Established", &format!("crd/{plural}.example.com"), "--timeout=30s"],
            None,
        );
    }
    // A Pod of example.com is no core Pod: no containers needed, no defaults, no admission
    // (service account, priority, enableServiceLinks), no status, no graceful deletion.
    let pod = "apiVersion: example.com/v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: none, size: 3}\n";
    server.kubectl(&["apply", "-f", "-"], Some(pod));
    let spec = server.kubectl(&["get", "pods.example.com", "p", "-o", "jsonpath={.spec}|{.status}"], None);
    assert_eq!(spec.trim(), r#"{"containers":"none","size":3}|"#);
    let table = server.kubectl(&["get", "pods.example.com"], None);
    assert!(
        table.starts_with("NAME") && table.lines().next().unwrap().split_whitespace().eq(["NAME", "AGE"]),
        "{table}"
    );
    server.kubectl(&["delete", "pods.example.com", "p", "--timeout=10s"], None);
    assert!(server.kubectl(&["get", "pods.example.com", "-o", "name"], None).trim().is_empty());

    // A Service of example.com gets no ClusterIP, and its `type` is nobody's business.
    let service = "apiVersion: example.com/v1\nkind: Service\nmetadata: {name: s}\nspec: {type: Anything, ports: 7}\n";
    server.kubectl(&["apply", "-f", "-"], Some(service));
    let spec = server.kubectl(&["get", "services.example.com", "s", "-o", "jsonpath={.spec}"], None);
    assert_eq!(spec.trim(), r#"{"ports":7,"type":"Anything"}"#);

    // A Namespace of example.com named `default` is not the protected namespace, gets no
    // `kubernetes` finalizer, and goes at once.
    let namespace = "apiVersion: example.com/v1\nkind: Namespace\nmetadata: {name: default}\nspec: {}\n";
    server.kubectl(&["apply", "-f", "-"], Some(namespace));
    let spec = server.kubectl(&["get", "namespaces.example.com", "default", "-o", "jsonpath={.spec}{.status}"], None);
    assert_eq!(spec.trim(), "{}");
    server.kubectl(&["delete", "namespaces.example.com", "default", "--timeout=10s"], None);
    assert!(server.kubectl(&["get", "namespaces.example.com", "-o", "name"], None).trim().is_empty());
    // The built-in ones are as they were.
    assert!(server.kubectl(&["get", "namespace", "default", "-o", "name"], None).contains("namespace/default"));
}

#[test]
fn cel_rules_run_within_upstreams_cost_budget() {
    // Two rules, each within the static limit for lists of at most 300 names in at most 10
    // groups, but together dearer than the 10,000,000 one object may spend at those sizes.
    let definition = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: rosters.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: rosters, kind: Roster}
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
              groups:
                type: array
                maxItems: 10
                items:
                  type: array
                  maxItems: 300
                  items: {type: string, maxLength: 5}
                  x-kubernetes-validations:
                  - rule: "self.all(x, self.exists_one(y, x == y))"
                    message: names are unique
                  - rule: "self.all(x, self.all(y, x == y || x != y))"
"#;
    let server = server();
    server.kubectl(&["apply", "-f", "-"], Some(definition));
    server.kubectl(&["wait", "--for=condition=Established", "crd/rosters.example.com", "--timeout=30s"], None);
    let roster = |name: &str, groups: usize, names: usize, duplicate: bool| {
        let groups: Vec<String> = (0..groups)
            .map(|g| {
                let mut names: Vec<String> = (0..names).map(|i| format!("n{}", g * 1000 + i)).collect();
                if duplicate && g == groups - 1 {
                    names[1] = names[0].clone();
                }
                format!("[{}]", names.join(","))
            })
            .collect();
        format!(
            "apiVersion: example.com/v1\nkind: Roster\nmetadata: {{name: {name}}}\nspec: {{groups: [{}]}}\n",
            groups.join(",")
        )
    };
    server.kubectl(&["apply", "-f", "-"], Some(&roster("small", 10, 30, false)));
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&roster("twin", 10, 30, true)));
    assert!(error.contains("spec.groups[9]: Invalid value: \"array\": names are unique"), "{error}");
    let error = server.kubectl_fails(&["apply", "-f", "-"], Some(&roster("large", 10, 300, false)));
    assert!(
        error.contains("Invalid value: \"array\": validation failed due to running out of cost budget, no further validation rules will be run"),
        "{error}"
    );
}

const SCALED: &str = r#"
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
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas, labelSelectorPath: .status.selector}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec: {type: object, properties: {replicas: {type: integer}}}
          status: {type: object, properties: {replicas: {type: integer}, selector: {type: string}}}
"#;

/// An HPA on a custom resource (upstream's "Should scale with a CRD targetRef"): the autoscaler
/// reads the target's `/scale` (found by discovery), finds its pods by the Scale's selector, and
/// scales it through `/scale`; a target below the autoscaler's minimum is brought up to it
/// whatever the metrics, as upstream does.
#[test]
fn an_autoscaler_scales_a_custom_resource_through_its_scale_subresource() {
    let server = server();
    server.kubectl(&["apply", "-f", "-"], Some(SCALED));
    server.kubectl(&["wait", "--for=condition=Established", "crd/crontabs.stable.example.com", "--timeout=30s"], None);
    let crontab = "apiVersion: stable.example.com/v1\nkind: CronTab\nmetadata: {name: nightly}\nspec: {replicas: 1}\n";
    server.kubectl(&["apply", "-f", "-"], Some(crontab));
    server.kubectl(
        &["patch", "crontab", "nightly", "--subresource=status", "--type=merge", "-p", r#"{"status":{"replicas":1,"selector":"app=nightly"}}"#],
        None,
    );
    let hpa = r#"
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: nightly}
spec:
  scaleTargetRef: {apiVersion: stable.example.com/v1, kind: CronTab, name: nightly}
  minReplicas: 3
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(hpa));
    eventually("the autoscaler to scale the custom resource to its minimum", || {
        server.kubectl(&["get", "crontab", "nightly", "-o", "jsonpath={.spec.replicas}"], None) == "3"
    });
    let scale = server.kubectl(&["get", "--raw", "/apis/stable.example.com/v1/namespaces/default/crontabs/nightly/scale"], None);
    let scale: serde_json::Value = serde_json::from_str(&scale).unwrap();
    assert_eq!((scale["spec"]["replicas"].as_i64(), scale["status"]["selector"].as_str()), (Some(3), Some("app=nightly")));
    // Upstream's words for the rescale, in an Event; the status says the scale can be read.
    eventually("the rescale's event", || {
        let events = server.kubectl(
            &["get", "events", "--field-selector", "involvedObject.kind=HorizontalPodAutoscaler", "-o", "jsonpath={.items[*].message}"],
            None,
        );
        events.contains("New size: 3; reason: Current number of replicas below Spec.MinReplicas")
    });
    eventually("the autoscaler's status to say it can read the scale", || {
        let conditions = server.kubectl(&["get", "hpa", "nightly", "-o", "jsonpath={.status.conditions}"], None);
        conditions.contains("SucceededGetScale") || conditions.contains("SucceededRescale")
    });
    // A target without a selector in its scale cannot be autoscaled: the status says why.
    let bare = crontab.replace("nightly", "bare");
    server.kubectl(&["apply", "-f", "-"], Some(&bare));
    server.kubectl(&["apply", "-f", "-"], Some(&hpa.replace("nightly", "bare")));
    eventually("the autoscaler to report the missing selector", || {
        let conditions = server.kubectl(&["get", "hpa", "bare", "-o", "jsonpath={.status.conditions}"], None);
        conditions.contains("FailedGetScale") && conditions.contains("has no selector")
    });
    assert_eq!(server.kubectl(&["get", "crontab", "bare", "-o", "jsonpath={.spec.replicas}"], None), "1");
}
