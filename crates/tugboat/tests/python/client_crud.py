"""CRUD, list, watch and scale through the official Python client (`pip install kubernetes`).

Run with KUBECONFIG pointing at a Tugboat server; exits non-zero on the first failure.
"""

import sys

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config()
core = client.CoreV1Api()
apps = client.AppsV1Api()
NS = "python"


def check(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
names = [ns.metadata.name for ns in core.list_namespace().items]
check(NS in names and "kube-system" in names, f"namespaces listed: {names}")

cm = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings", labels={"app": "py"}), data={"a": "1"})
created = core.create_namespaced_config_map(NS, cm)
check(created.metadata.uid and created.metadata.resource_version, "create returns uid and resourceVersion")

read = core.read_namespaced_config_map("settings", NS)
check(read.data == {"a": "1"}, f"read back: {read.data}")

patched = core.patch_namespaced_config_map("settings", NS, {"data": {"b": "2"}})
check(patched.data == {"a": "1", "b": "2"}, f"patched: {patched.data}")

patched.data["c"] = "3"
replaced = core.replace_namespaced_config_map("settings", NS, patched)
check(replaced.data.get("c") == "3", "replaced")

try:
    stale = read
    stale.data = {"stale": "yes"}
    core.replace_namespaced_config_map("settings", NS, stale)
    check(False, "a stale resourceVersion must conflict")
except ApiException as error:
    check(error.status == 409, f"stale update answered {error.status}")

selected = core.list_namespaced_config_map(NS, label_selector="app=py").items
check([c.metadata.name for c in selected] == ["settings"], "label selector")
check(core.list_namespaced_config_map(NS, label_selector="app=other").items == [], "non-matching selector")

# Watch from the list's resourceVersion: sees a create, an update and a delete.
start = core.list_namespaced_config_map(NS).metadata.resource_version
core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="watched")))
core.patch_namespaced_config_map("watched", NS, {"data": {"x": "y"}})
core.delete_namespaced_config_map("watched", NS)
seen = []
for event in watch.Watch().stream(core.list_namespaced_config_map, NS, resource_version=start, timeout_seconds=3):
    if event["object"].metadata.name == "watched":
        seen.append(event["type"])
    if len(seen) == 3:
        break
check(seen == ["ADDED", "MODIFIED", "DELETED"], f"watch events: {seen}")

try:
    core.read_namespaced_config_map("watched", NS)
    check(False, "a deleted object must be gone")
except ApiException as error:
    check(error.status == 404, f"read after delete answered {error.status}")

deployment = client.V1Deployment(
    metadata=client.V1ObjectMeta(name="web"),
    spec=client.V1DeploymentSpec(
        replicas=1,
        selector=client.V1LabelSelector(match_labels={"app": "web"}),
        template=client.V1PodTemplateSpec(
            metadata=client.V1ObjectMeta(labels={"app": "web"}),
            spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx:1.25")]),
        ),
    ),
)
apps.create_namespaced_deployment(NS, deployment)
apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 4}})
scale = apps.read_namespaced_deployment_scale("web", NS)
check(scale.spec.replicas == 4, f"scale: {scale.spec.replicas}")

core.delete_namespaced_config_map("settings", NS)
print("python client: ok")
