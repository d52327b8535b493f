"""What the service says about itself, without Serve: /info's public view and why a deployment cannot run.

`public_location` is how /info names a configured artifact: an object-storage URI as configured
(without credentials or query), never a path on the server's disk.

`unschedulable_reason` reads one deployment's details as the Serve controller reports them
(`ServeInstanceDetails.applications[app].deployments[name]`, JSON) and the free resources of
each alive node: when no replica runs or has been placed, and no node has room for one, the
ingress answers 503 with this reason at once instead of waiting for its request timeout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

LOCAL = "local"  # what /info shows for a path on the server's own disk
GIB = 1024**3


def public_location(uri: str | None) -> str | None:
    if uri is None:
        return None
    if "://" not in uri or uri.startswith("file://"):
        return LOCAL
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def public_model(name: str) -> str:
    """A model setting as /info shows it: a preset name (or hub:owner/repo, either with its @revision) as is,
    a folder as a location."""
    return public_location(name) if "/" in name.partition("@")[0] and not name.startswith("hub:") else name


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(
        f"{k}={v / GIB:.3g}GiB" if k in ("memory", "object_store_memory") else f"{k}={v:g}" for k, v in sorted(resources.items())
    )


def unschedulable_reason(deployment: Mapping[str, Any], free_per_node: Sequence[Mapping[str, float]]) -> str | None:
    """Why `deployment` cannot serve now, or None when it runs, is being placed or starting, or has room.

    None also when Serve has not decided on a replica yet (a scale from zero the request itself
    triggers): the caller asks again a moment later.
    """
    replicas = deployment.get("replicas") or []
    if any(r.get("state") == "RUNNING" or r.get("node_id") for r in replicas):
        return None  # running, or placed on a node and initialising: it will answer
    pending = [r for r in replicas if r.get("state") == "STARTING"]
    if not pending:
        return None
    required = {k: float(v) for k, v in (deployment.get("required_resources") or {}).items() if v}
    if any(all(node.get(k, 0.0) >= v for k, v in required.items()) for node in free_per_node):
        return None  # there is room: the replica is about to be placed
    name = deployment.get("name", "the deployment")
    most = {k: max((node.get(k, 0.0) for node in free_per_node), default=0.0) for k in required}
    return (
        f"{name} cannot be scheduled: no replica is running, one needs {_fmt(required) or 'no resources'} and no node "
        f"has that free (the most free on one node: {_fmt(most) or 'nothing'}). On an autoscaling cluster a node is "
        f"being added: retry later. Otherwise free those resources or lower the {name} deployment's "
        f"ray_actor_options (serve/config.yaml)."
    )
