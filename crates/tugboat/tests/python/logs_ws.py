"""A pod's log over a websocket, as upstream's e2e suite reads it: argv = pod, container,
subprotocol (binary.k8s.io: binary messages, or base64.binary.k8s.io: each message base64
text); prints what the messages carried, then `closed`."""
import base64
import ssl
import sys
from urllib.parse import urlencode

import websocket
from kubernetes import client, config

c = client.Configuration()
config.load_kube_config(client_configuration=c)
pod, container, protocol = sys.argv[1], sys.argv[2], sys.argv[3]
url = c.host.replace("https://", "wss://") + f"/api/v1/namespaces/default/pods/{pod}/log?" + urlencode(
    [("container", container)])
ws = websocket.create_connection(
    url, subprotocols=[protocol],
    sslopt={"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": c.ssl_ca_cert, "certfile": c.cert_file, "keyfile": c.key_file})
assert ws.getsubprotocol() == protocol, ws.getsubprotocol()
received = []
while True:
    try:
        message = ws.recv()
    except websocket.WebSocketConnectionClosedException:
        break
    if not message:
        break
    if protocol == "base64.binary.k8s.io":
        assert isinstance(message, str), message
        received.append(base64.b64decode(message).decode())
    else:
        assert isinstance(message, bytes), message
        received.append(message.decode())
sys.stdout.write("".join(received))
print("closed")
