"""The engine replicas a process's router currently knows, published for the ingress (/metrics,
the admin view, tests) — one home outside router.py, because Ray Serve pickles a router's module
by value: a dict kept in router.py would be the router's private copy.

The router (on Ray Serve's router event loop) replaces an app's entry whole; readers on other
threads copy what they read.
"""

from __future__ import annotations

from typing import Any

_RUNNING: dict[str, dict[str, Any]] = {}  # app name → replica id → RunningReplica


def publish(app_name: str, replicas: dict[str, Any]) -> None:
    """replicas: replica id → Ray Serve's RunningReplica (its `routing_stats` read at each `running`)."""
    _RUNNING[app_name] = dict(replicas)


def running(app_name: str) -> dict[str, dict]:
    """replica id → its latest routing stats ({} until Ray Serve collected them once)."""
    return {rid: dict(r.routing_stats or {}) for rid, r in _RUNNING.get(app_name, {}).items()}
