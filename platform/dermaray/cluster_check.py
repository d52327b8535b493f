"""A dermaray config checked against the cluster it is meant for, before anything is submitted.

    problems = check_cluster(cfg, yaml.safe_load(open("cluster.yaml")), yaml.safe_load(open("serve/config.yaml")))
    dermaray check-cluster --config configs/cluster.yaml --cluster cluster.yaml   # one line per problem, exit 1

Pure: it reads the parsed files and nothing else (no Ray, no cloud API). What it checks:

- every resource a job asks for (engine and embedding actors, Ray Train workers, the diffusion
  evaluation task, Serve replicas) is provided by some node type of the autoscaler config, and
  one actor's or worker's CPU / GPU / memory / custom resources fit on one node of that type;
- actor concurrency, training workers and `max_replicas` fit in the node types' `max_workers`
  x what one node holds;
- every location in the config is object storage (the nodes share no filesystem);
- every model preset named exists in the registry.

A node type's capacity is what Ray's AWS autoscaler gives it: CPU, GPU and memory from its
instance type, then what its `resources` declares (custom resources, or CPU/GPU overrides).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from dermaray.config import DermarayConfig
from dermaray.models.registry import ROLES, get_preset
from dermaray.storage import is_remote

# vCPUs, GPUs, GiB of RAM of the instance types this project's cluster.yaml uses (AWS's published
# figures); another type must declare CPU and GPU in its node type's `resources`.
INSTANCE_TYPES: dict[str, tuple[int, int, int]] = {
    "m6i.2xlarge": (8, 0, 32),
    "m6i.4xlarge": (16, 0, 64),
    "m6i.8xlarge": (32, 0, 128),
    "m6i.16xlarge": (64, 0, 256),
    "g5.xlarge": (4, 1, 16),
    "g5.12xlarge": (48, 4, 192),
    "g6e.xlarge": (4, 1, 32),
    "g6e.12xlarge": (48, 4, 384),
    "p4d.24xlarge": (96, 8, 1152),
    "p5.48xlarge": (192, 8, 2048),
}
# Ray's `memory` resource on a node: what is left after the object store (30% of RAM by default).
MEMORY_FRACTION = 0.7
GIB = 1024**3
DEFAULT_SERVE_CPUS = 1.0  # a Serve replica's num_cpus when ray_actor_options does not say

# Free-text string settings that name no location; every other string setting (outside the
# sections below) is a location and must be on object storage on a cluster. A new string setting
# that is not a location belongs here, or the check on configs/cluster.yaml says so.
NOT_LOCATIONS = {
    "ray.address",
    "notes.dtype",
    "grounding.run_name",
    "classifier.run_name",
    "diffusion.run_name",
    "serve.api_key",
    "serve.api_key_env",
}
# Per node by design: each node keeps its own model cache and reads its own secret file.
NODE_LOCAL = {"models.cache_dir", "serve.api_key_file"}
SKIPPED_SECTIONS = {"storage_options", "notes.engine_env", "notes.engine_kwargs"}
KEYWORDS = {"embeddings.model": {"frozen"}}  # values with a meaning of their own, not paths


@dataclass(frozen=True)
class Problem:
    key: str  # where: `notes.concurrency`, `cluster.yaml available_node_types`, `serve/config.yaml Generation`
    message: str  # what is wrong and the fix

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


@dataclass(frozen=True)
class NodeType:
    name: str
    capacity: dict[str, float]  # one node: CPU, GPU, memory (bytes) and custom resources
    max_nodes: int


@dataclass(frozen=True)
class Ask:
    key: str  # the config key to change
    what: str  # "engine actor", "training worker", ...
    per_unit: dict[str, float]  # resources one actor / worker / replica asks for
    count: int  # how many run at once
    count_key: str | None  # the key that sets the count


def node_types(cluster: dict[str, Any]) -> tuple[list[NodeType], list[Problem]]:
    """The node types of an autoscaler config with their per-node capacity and node count."""
    problems, types = [], []
    cluster_max = int(cluster.get("max_workers", 0))
    head = cluster.get("head_node_type")
    for name, spec in (cluster.get("available_node_types") or {}).items():
        declared = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        instance = (spec.get("node_config") or {}).get("InstanceType")
        capacity: dict[str, float] = {}
        if instance in INSTANCE_TYPES:
            cpus, gpus, gib = INSTANCE_TYPES[instance]
            capacity = {"CPU": cpus, "GPU": gpus, "memory": MEMORY_FRACTION * gib * GIB}
        elif "CPU" not in declared:
            problems.append(
                Problem(
                    f"cluster.yaml available_node_types.{name}",
                    f"instance type {instance!r} is not one this check knows: declare its CPU and GPU "
                    f"in `resources` (e.g. {{CPU: 8, GPU: 1}})",
                )
            )
        capacity.update(declared)
        workers = min(int(spec.get("max_workers", cluster_max)), cluster_max)
        types.append(NodeType(name, capacity, workers + (1 if name == head else 0)))
    if not types:
        problems.append(Problem("cluster.yaml available_node_types", "no node types: nothing can be scheduled"))
    return types, problems


def asks(cfg: DermarayConfig, serve_config: dict[str, Any] | None) -> list[Ask]:
    """Everything the jobs and the Serve app ask the cluster for."""
    n, e = cfg.notes, cfg.embeddings
    out = [
        Ask(
            "notes",
            "vLLM engine actor",
            {"CPU": n.num_cpus, "GPU": n.num_gpus, **n.resources},
            n.concurrency,
            "notes.concurrency",
        ),
        Ask(
            "embeddings",
            "embedding actor",
            {"CPU": e.num_cpus, "GPU": e.num_gpus, **e.resources},
            e.concurrency,
            "embeddings.concurrency",
        ),
    ]
    for section in ("grounding", "classifier", "diffusion"):
        t = getattr(cfg, section).train
        per_worker = {"CPU": t.cpus_per_worker, "GPU": 1.0 if t.use_gpu else 0.0, **t.resources}
        out.append(Ask(f"{section}.train", "Ray Train worker", per_worker, t.num_workers, f"{section}.train.num_workers"))
    ev = cfg.diffusion_eval
    out.append(Ask("diffusion_eval", "evaluation task", {"CPU": ev.num_cpus, "GPU": ev.num_gpus}, 1, None))
    for app in (serve_config or {}).get("applications") or []:
        for d in app.get("deployments") or []:
            options = d.get("ray_actor_options") or {}
            per_replica = {
                "CPU": float(options.get("num_cpus", DEFAULT_SERVE_CPUS)),
                "GPU": float(options.get("num_gpus", 0)),
                "memory": float(options.get("memory", 0)),
                **(options.get("resources") or {}),
            }
            scaling = d.get("autoscaling_config") or {}
            replicas = int(scaling.get("max_replicas", d.get("num_replicas", 1)) or 1)
            key = f"serve/config.yaml {app.get('name', '?')}.{d['name']}"
            out.append(Ask(key, "Serve replica", per_replica, replicas, f"{key} max_replicas"))
    return out


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v / GIB:g}GiB" if k == "memory" else f"{k}={v:g}" for k, v in resources.items() if v)


def check_ask(ask: Ask, types: list[NodeType]) -> list[Problem]:
    wanted = {k: float(v) for k, v in ask.per_unit.items() if v}
    missing = sorted(k for k in wanted if not any(t.capacity.get(k, 0) > 0 for t in types))
    if missing:
        return [
            Problem(
                ask.key,
                f"a {ask.what} asks for {', '.join(missing)}, which no node type of cluster.yaml provides: "
                f"add it to a node type's `resources`, or ask for resources the cluster has",
            )
        ]
    hosts = [t for t in types if all(t.capacity.get(k, 0) >= v for k, v in wanted.items())]
    if not hosts:
        most = {k: max(t.capacity.get(k, 0) for t in types) for k in wanted}
        short = {k: m for k, m in most.items() if m < wanted[k]}
        why = f"the most one node has: {_fmt(short)}" if short else "no one node type has all of it"
        return [
            Problem(
                ask.key,
                f"a {ask.what} asks for {_fmt(wanted)}, more than one node of any type holds ({why}): "
                f"ask for less per {ask.what}, or add a larger node type",
            )
        ]
    per_node = {
        t.name: min(math.floor(t.capacity[k] / v + 1e-9) for k, v in wanted.items()) if wanted else math.inf for t in hosts
    }
    room = sum(per_node[t.name] * t.max_nodes for t in hosts)
    if ask.count > room:
        where = ", ".join(f"{t.name}: {t.max_nodes} node(s) x {per_node[t.name]}" for t in hosts)
        return [
            Problem(
                ask.count_key or ask.key,
                f"{ask.count} {ask.what}s at once, but the node types that can host one hold at most {room} "
                f"({where}): lower {ask.count_key or 'the count'} to {room}, or raise those node types' max_workers",
            )
        ]
    return []


def _is_text(annotation: Any) -> bool:
    """A free-text string setting (str or str | None; not a Literal, list or dict)."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    return (
        bool(args) and str in args and all(a in (str, type(None)) for a in args) and typing.get_origin(annotation) is not Literal
    )


def locations(model: BaseModel, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every location setting that is set."""
    out = []
    for name, field in type(model).model_fields.items():
        key, value = f"{prefix}{name}", getattr(model, name)
        if key in SKIPPED_SECTIONS or key in NOT_LOCATIONS or key in NODE_LOCAL or key.startswith("models."):
            continue
        if isinstance(value, BaseModel):
            out += locations(value, f"{key}.")
        elif isinstance(value, str) and _is_text(field.annotation) and value not in KEYWORDS.get(key, ()):
            out.append((key, value))
    return out


def check_locations(cfg: DermarayConfig) -> list[Problem]:
    return [
        Problem(
            key,
            f"{value!r} is a path on one machine; the cluster's nodes share no filesystem: "
            f"use object storage (s3://YOUR-BUCKET/..., gs://...)",
        )
        for key, value in locations(cfg)
        if not is_remote(value)
    ]


def check_models(cfg: DermarayConfig) -> list[Problem]:
    """Every role names a preset (each node fetches or builds it); hub presets can be fetched."""
    problems, hub = [], []
    for role in ROLES:
        name = getattr(cfg.models, role)
        try:
            preset = get_preset(role, name)
        except ValueError as exc:
            problems.append(
                Problem(
                    f"models.{role}",
                    f"{exc}; a folder exists on one machine only: on a cluster name a "
                    f"preset, which every node fetches into models.cache_dir",
                )
            )
            continue
        if preset.hub_id is not None:
            hub.append(f"models.{role}")
    store = getattr(cfg.models, "store", None)  # the object-storage mirror nodes pull from
    if store and not is_remote(store):
        problems.append(Problem("models.store", f"{store!r} is a path on one machine: use s3://... or gs://..."))
    if hub and getattr(cfg.models, "offline", False) and not store:
        problems.append(
            Problem(
                "models.offline",
                f"true, while {', '.join(hub)} name hub models and models.store is not set: "
                f"a fresh node has none of them cached; set models.offline=false, or "
                f"models.store after `dermaray models push`",
            )
        )
    return problems


def check_cluster(cfg: DermarayConfig, cluster: dict[str, Any], serve_config: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem found, in config order; empty when the config fits the cluster."""
    types, problems = node_types(cluster)
    if types:
        for ask in asks(cfg, serve_config):
            problems += check_ask(ask, types)
    return problems + check_locations(cfg) + check_models(cfg)


def main(argv: list[str] | None = None, prog: str = "dermaray check-cluster") -> int:
    """CLI: print one line per problem; exit status 1 when there are any."""
    import argparse
    from pathlib import Path

    import yaml

    from dermaray.config import load_config

    parser = argparse.ArgumentParser(prog=prog, description="Check a dermaray config against a Ray autoscaler config.")
    parser.add_argument("--config", "-c", required=True, help="the dermaray config the jobs run with (configs/cluster.yaml)")
    parser.add_argument("--cluster", required=True, help="the Ray autoscaler config (cluster.yaml)")
    parser.add_argument(
        "--serve",
        default=None,
        help="the Serve config whose replicas must fit (default: serve/config.yaml beside the config's folder, when present)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value, as for the jobs")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cluster = yaml.safe_load(Path(args.cluster).read_text()) or {}
        serve_path = Path(args.serve) if args.serve else Path(args.config).resolve().parents[1] / "serve" / "config.yaml"
        serve_config = yaml.safe_load(serve_path.read_text()) if (args.serve or serve_path.is_file()) else None
    except Exception as exc:  # unreadable or invalid files: one clear line
        parser.error(str(exc))
    problems = check_cluster(cfg, cluster, serve_config)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{args.config} fits {args.cluster}" + (f" and {serve_path}" if serve_config else ""))
    return 1 if problems else 0
