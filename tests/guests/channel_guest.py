"""A minimal guest program for the Cloud Hypervisor stand-in: it speaks the guest channel for real.

Run by the stand-in after vm.boot, like a guest agent would start after the kernel: it connects to the
host end as vsock does on the host side (`$HEARTH_VSOCK_SOCKET_1024`), says hello with the node id from
the SMBIOS OEM string and the GPUs the stand-in passed it ($HEARTH_GUEST_GPUS), takes its config, says ready, and
heartbeats. It powers off (exits) when the host
says stop, `--poweroff-after S` seconds after it joined, on SIGTERM (the power button), or when the host
end goes away (its parent died). It does not reconnect: it is less forgiving than the real guest agent.
"""

import json
import os
import select
import signal
import socket
import sys
import time

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
node = dict(line.split("=", 1) for line in os.environ["HEARTH_SMBIOS_OEM"].splitlines())["hearth-node"]
path = os.environ["HEARTH_VSOCK_SOCKET"] + "_1024"
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(path)
stream = sock.makefile("rwb")


def send(message):
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


send({"op": "hello", "node": node, "detail": f"guest pid {os.getpid()}",
      "gpus": json.loads(os.environ.get("HEARTH_GUEST_GPUS") or "[]")})
config = json.loads(stream.readline())
print(f"guest {node}: config {sorted(config)}", flush=True)
send({"op": "ready"})
deadline = time.monotonic() + (float(sys.argv[sys.argv.index("--poweroff-after") + 1])
                               if "--poweroff-after" in sys.argv else 1e9)
while time.monotonic() < deadline:
    if not select.select([sock], [], [], 0.1)[0]:
        send({"op": "heartbeat"})
        continue
    line = stream.readline()
    if not line or json.loads(line).get("op") == "stop":
        break
print(f"guest {node}: powering off", flush=True)
