"""The official Python client's exec (websocket, v4.channel.k8s.io) against a running pod:
argv = pod, container, command...; prints what the command printed, then its exit code."""
import sys

from kubernetes import client, config
from kubernetes.stream import stream

config.load_kube_config()
api = client.CoreV1Api()
pod, container, command = sys.argv[1], sys.argv[2], sys.argv[3:]
resp = stream(api.connect_get_namespaced_pod_exec, pod, "default", container=container,
              command=command, stderr=True, stdin=False, stdout=True, tty=False,
              _preload_content=False)
resp.run_forever(timeout=30)
sys.stdout.write(resp.read_stdout() if resp.peek_stdout() else "")
print(f"exit={resp.returncode}")
