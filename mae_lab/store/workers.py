"""Who runs a trial: a worker's identity, and whether a recorded worker is a dead process of this machine.

A worker is ``host:node:pid``. ``node`` names the process-ID space the PID belongs to: a hash of the kernel's boot ID
(new at every boot, different on every machine) and the PID namespace (different in every container), so that two
machines, or two containers, that share a hostname never take each other's live trials for dead ones (a PID says
nothing outside its own space). The hostname stays for people reading ``mae-lab show``. Where /proc has no boot ID
(not Linux), the machine's network address (``uuid.getnode``) stands in.
"""
from __future__ import annotations

import functools
import hashlib
import os
import socket
import uuid


@functools.cache
def node() -> str:
    """12 hex digits naming this boot of this machine and this PID namespace."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            parts.append(open(path).read().strip())
        except OSError:
            parts.append("")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        parts.append("")
    if not parts[0]:
        parts.append(str(uuid.getnode()))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def worker_id() -> str:
    """This process as a worker: ``host:node:pid``."""
    return f"{socket.gethostname()}:{node()}:{os.getpid()}"


def local_prefix() -> str:
    """What every worker of this machine's PID space starts with (``host:node:``)."""
    return f"{socket.gethostname()}:{node()}:"


def dead_here(worker: str | None) -> bool:
    """Whether ``worker`` is a process of this machine's PID space that no longer exists. A worker of another
    machine, or one recorded by an older mae-lab as ``host:pid``, is never judged here: its heartbeat decides."""
    if not worker or not worker.startswith(local_prefix()):
        return False
    pid = worker[len(local_prefix()):]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
