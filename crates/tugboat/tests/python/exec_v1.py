"""An exec over the oldest websocket subprotocol, channel.k8s.io, as upstream's e2e suite
speaks it: argv = pod, container, command...; prints each message as `<channel> <text>`."""
import ssl
import sys
from urllib.parse import urlencode

import websocket
from kubernetes import client, config

c = client.Configuration()
config.load_kube_config(client_configuration=c)
pod, container, command = sys.argv[1], sys.argv[2], sys.argv[3:]
query = urlencode([("stdout", "1"), ("stderr", "1"), ("container", container)] + [("command", a) for a in command])
url = c.host.replace("https://", "wss://") + f"/api/v1/namespaces/default/pods/{pod}/exec?{query}"
ws = websocket.create_connection(
    url, subprotocols=["channel.k8s.io"],
    sslopt={"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": c.ssl_ca_cert, "certfile": c.cert_file, "keyfile": c.key_file})
while True:
    try:
        message = ws.recv()
    except websocket.WebSocketConnectionClosedException:
        break
    if not message:
        break
    if isinstance(message, str):
        message = message.encode()
    print(message[0], message[1:].decode(errors="replace").rstrip("\n"))
