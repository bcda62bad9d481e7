"""Which process listens on a port, read from /proc (no tool needed): tells Serve's ingress
replica (direct ingress) from Serve's proxy."""
from __future__ import annotations

import os
from pathlib import Path

REPLICA = "ray::ServeReplica:fapool:FAPoolIngress"  # the ingress replica's process title
PROXY = "ray::ProxyActor"


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def listener(port: int) -> str:
    """The command line of the process listening on `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{entry}/fd")):
                return cmdline(int(entry))
        except OSError:  # another user's process, or it exited meanwhile
            pass
    raise AssertionError(f"nothing listens on port {port}")
