"""An operator written with kopf, as its users write one: run by `kopf run` against the
server of $KUBECONFIG (tests/operators.rs starts it).

Notes (tugboat.test/v1) are validated and defaulted by kopf's own admission webhooks (kopf
registers the webhook configurations itself, with a self-signed CA as their caBundle), counted
into their status on creation, and recorded in a ConfigMap when deleted (kopf's finalizer).
"""

import os
import subprocess
import tempfile

import kopf
import kubernetes

PORT = int(os.environ["KOPF_WEBHOOK_PORT"])


class SelfSignedServer(kopf.WebhookServer):
    """kopf's server, its self-signed certificate made with the openssl command rather than
    `certbuilder` (whose `oscrypto` cannot read OpenSSL 3's version string): the same
    certificate, its own CA, with the host as a SAN, given to the API server as caBundle."""

    @staticmethod
    def build_certificate(hostnames, password=None):
        with tempfile.TemporaryDirectory() as directory:
            cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
            sans = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hostnames if h)
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-keyout", key, "-out", cert, "-subj", f"/CN={hostnames[0]}",
                 "-addext", f"subjectAltName={sans}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=digitalSignature,keyEncipherment,keyCertSign"],
                check=True, capture_output=True)
            with open(cert, "rb") as c, open(key, "rb") as k:
                return c.read(), k.read()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.admission.server = SelfSignedServer(addr="127.0.0.1", host="127.0.0.1", port=PORT)
    settings.admission.managed = "notes.tugboat.test"
    settings.watching.server_timeout = 60
    settings.posting.level = 0


@kopf.on.validate("tugboat.test", "v1", "notes")
def needs_text(spec, **_):
    if not spec.get("text"):
        raise kopf.AdmissionError("a note needs text", code=422)


@kopf.on.mutate("tugboat.test", "v1", "notes")
def default_author(spec, patch, **_):
    if "author" not in spec:
        patch.spec["author"] = "kopf"


@kopf.on.create("tugboat.test", "v1", "notes")
def count(spec, **_):
    return {"words": len(spec["text"].split())}


@kopf.on.delete("tugboat.test", "v1", "notes")
def remember(name, namespace, spec, **_):
    kubernetes.config.load_kube_config()
    body = kubernetes.client.V1ConfigMap(
        metadata=kubernetes.client.V1ObjectMeta(name=f"deleted-{name}"), data={"text": spec["text"]})
    kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, body)
