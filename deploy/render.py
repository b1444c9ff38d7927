#!/usr/bin/env python3
"""Render kvstore's container deployments: the cluster map, one node TOML per replica, and either a
docker compose file or Kubernetes manifests.

    python deploy/render.py compose --shards 3 --replicas 3    # deploy/docker-compose.yml + deploy/compose/
    python deploy/render.py k8s --shards 3 --replicas 3        # deploy/k8s/ (--namespace, --image, ...)

Every node binds 0.0.0.0 and advertises a DNS name (a compose service name, or a StatefulSet pod's
stable name behind its headless Service). The files are built with kvstore's own NodeConfig and
ClusterMap, so the formats cannot drift from what `kvstore node` and `kvstore router` load.
Only the standard library, tomli_w and kvstore itself are used: YAML is written by a small emitter.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEPLOY_DIR = Path(__file__).resolve().parent
REPO_DIR = DEPLOY_DIR.parent
# Prefer this checkout's kvstore over any other installed copy: the configs must match this code.
if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from kvstore.config import NodeConfig  # noqa: E402
from kvstore.routing.cluster_map import ClusterMap, ReplicaInfo, ShardInfo  # noqa: E402

GRPC_PORT = 7000
RAFT_PORT = 7001
HEALTH_PORT = 7002  # grpc.health.v1 only, plaintext: what probes and healthchecks ask
ROUTER_PORT = 7400
CONFIG_MOUNT = "/etc/kvstore"  # where the rendered cluster.json and nodes/ are mounted
# Where a node finds its shard's Raft secret (shard-<N>.key): a Kubernetes Secret or a compose secret,
# never the ConfigMap or a rendered file. The node configs only name the file.
SECRETS_MOUNT = "/etc/kvstore-secrets"
COMPOSE_SECRETS_DIR = "secrets"  # beside docker-compose.yml: shard-<N>.key, created by the operator
DATA_MOUNT = "/data"  # the image's data volume
APP = "kvstore"
SHARD_LABEL = "kvstore.io/shard"
CHECKSUM_ANNOTATION = "kvstore.io/config-sha256"
COMPOSE_CONFIG_DIR = "compose"  # beside docker-compose.yml: cluster.json + nodes/<service>.toml
DEFAULT_IMAGE = "kvstore:latest"


@dataclass(frozen=True)
class Placement:
    """Where one replica runs and how others reach it."""

    shard: int
    name: str  # node name = compose service name = Kubernetes pod name
    host: str  # the DNS name peers, clients and the router dial
    grpc_port: int = GRPC_PORT
    raft_port: int = RAFT_PORT
    health_port: int = HEALTH_PORT
    data_dir: str = DATA_MOUNT
    bind_host: str = "0.0.0.0"  # containers: accept traffic on whatever IP the runtime assigned

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"


@dataclass(frozen=True)
class Options:
    shards: int = 3
    replicas: int = 3
    vnodes: int = 256
    image: str = DEFAULT_IMAGE
    namespace: str = "kvstore"
    cluster_domain: str = "cluster.local"
    storage: str = "1Gi"
    router_replicas: int = 2
    settings: tuple[str, ...] = ()  # "SECTION.KEY=VALUE" overrides of NodeConfig's defaults

    def command_line(self, target: str) -> str:
        """The command that reproduces these files (written into each YAML header)."""
        args = [f"python deploy/render.py {target} --shards {self.shards} --replicas {self.replicas}"]
        args += [f"--vnodes {self.vnodes}", f"--image {self.image}"]
        if target == "k8s":
            args += [f"--namespace {self.namespace}", f"--cluster-domain {self.cluster_domain}"]
            args += [f"--storage {self.storage}", f"--router-replicas {self.router_replicas}"]
        args += [f"--set {shlex.quote(setting)}" for setting in self.settings]
        return " ".join(args)


def _sections() -> set[str]:
    """NodeConfig's settings sections (cluster, limits, raft, storage, server): all --set may change."""
    return {
        f.name
        for f in dataclasses.fields(NodeConfig)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
    }


def parse_settings(pairs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`raft.min_timeout=1.2` -> {"raft": {"min_timeout": 1.2}}; the value is read as TOML (numbers,
    booleans, "strings"). Names are checked when NodeConfig is built; identity fields are not settable."""
    settings: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or section not in _sections():
            raise ValueError(f"--set wants SECTION.KEY=VALUE with SECTION in {sorted(_sections())}: {pair!r}")
        try:
            settings.setdefault(section, {})[name] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--set {pair!r}: not a TOML value ({err})") from None
    return settings


# ----- layouts: names and DNS addresses ----------------------------------------------------------


def compose_layout(shards: int, replicas: int) -> list[list[Placement]]:
    """Compose service `s<shard>r<replica>`: Docker's embedded DNS resolves the service name."""
    return [[Placement(s, f"s{s}r{r}", f"s{s}r{r}") for r in range(replicas)] for s in range(shards)]


def statefulset_name(shard: int) -> str:
    return f"{APP}-s{shard}"  # also the name of its headless Service


def k8s_layout(shards: int, replicas: int, namespace: str, domain: str) -> list[list[Placement]]:
    """Pod `<statefulset>-<ordinal>`, resolvable as <pod>.<headless service>.<namespace>.svc.<domain>."""
    layout = []
    for s in range(shards):
        sts = statefulset_name(s)
        pods = [f"{sts}-{r}" for r in range(replicas)]
        layout.append([Placement(s, pod, f"{pod}.{sts}.{namespace}.svc.{domain}") for pod in pods])
    return layout


def secret_file_name(shard: int) -> str:
    return f"shard-{shard}.key"


def secret_name(shard: int) -> str:
    """The Kubernetes Secret holding shard N's Raft secret (key `raft.key`): one per shard, so a pod
    mounts only its own shard's secret."""
    return f"{APP}-s{shard}-raft"


def build(
    layout: list[list[Placement]],
    cluster_map_path: str,
    vnodes: int,
    settings: dict[str, dict[str, Any]] | None = None,
    secrets_dir: str = SECRETS_MOUNT,
) -> tuple[ClusterMap, list[NodeConfig]]:
    """The cluster map and every replica's NodeConfig: kvstore.config's defaults, then `settings`.
    Each config names its shard's secret file under `secrets_dir` (the secret itself is never rendered)."""
    shards = []
    configs = []
    # The cluster id (kvstore/config.py, [cluster] id): derived from the layout so a re-render
    # gives the same files; two deployments with the same names (a restored copy beside the
    # original, in the same namespace) must differ: pass --set 'cluster.id="..."'.
    addresses = "\n".join(p.raft_address for members in layout for p in members)
    cluster_id = hashlib.sha256(f"kvstore {cluster_map_path}\n{addresses}".encode()).hexdigest()[:16]
    for members in layout:
        shard = members[0].shard
        shards.append(
            ShardInfo(shard, tuple(ReplicaInfo(p.name, p.address, p.raft_address) for p in members))
        )
        for p in members:
            identity = {
                "name": p.name,
                "shard": shard,
                "listen": f"{p.bind_host}:{p.grpc_port}",
                "raft_bind": f"{p.bind_host}:{p.raft_port}",
                "raft_advertise": p.raft_address,
                # pysyncobj matches peers by these exact strings: every replica must use the others'
                # advertised names, never an IP, or connections are not recognised.
                "peers": [o.raft_address for o in members if o.name != p.name],
                "data_dir": p.data_dir,
                "cluster_map": cluster_map_path,
                "health_listen": f"{p.bind_host}:{p.health_port}",
            }
            sections: dict[str, Any] = dict(settings or {})
            secret = {"secret_file": f"{secrets_dir}/{secret_file_name(shard)}"}
            sections["raft"] = {**secret, **sections.get("raft", {})}
            sections["cluster"] = {"id": cluster_id, **sections.get("cluster", {})}
            # from_dict rejects unknown setting names, as `kvstore node` would when loading the file.
            configs.append(NodeConfig.from_dict({**identity, **sections}))
    cluster_map = ClusterMap(
        epoch=1, shards=tuple(shards), vnodes_per_shard=vnodes, cluster_id=configs[0].cluster.id
    )
    return cluster_map, configs


def config_files(cluster_map: ClusterMap, configs: Iterable[NodeConfig]) -> dict[str, str]:
    """`cluster.json` and `nodes/<name>.toml`, the layout `kvstore node`/`router --cluster` expect."""
    files = {"cluster.json": cluster_map.to_json() + "\n"}
    for config in configs:
        files[f"nodes/{config.name}.toml"] = config.to_toml()
    return files


# ----- docker compose ----------------------------------------------------------------------------


def _health_check(port: int) -> list[str]:
    # grpc.health.v1, as the Kubernetes probes ask: exits 0 only while the process reports SERVING.
    return ["CMD", "kvstore", "health", "--address", f"127.0.0.1:{port}"]


def _compose_service(image: str, command: list[str], port: int) -> dict[str, Any]:
    return {
        "image": image,
        # Never pull "kvstore:latest" from a registry: a stranger's image of that name could exist.
        "pull_policy": "never",
        "command": command,
        "read_only": True,
        "tmpfs": ["/tmp"],
        "restart": "unless-stopped",
        "stop_grace_period": "30s",
        "healthcheck": {
            "test": _health_check(port),
            "interval": "5s",
            "timeout": "3s",
            "retries": 5,
            "start_period": "60s",  # journal replay after a restart: failures then do not count
        },
    }


def compose_file(layout: list[list[Placement]], opts: Options) -> dict[str, Any]:
    services: dict[str, Any] = {}
    volumes: dict[str, Any] = {}
    config_volume = f"./{COMPOSE_CONFIG_DIR}:{CONFIG_MOUNT}:ro"
    for p in (p for members in layout for p in members):
        service = _compose_service(
            opts.image, ["node", "--config", f"{CONFIG_MOUNT}/nodes/{p.name}.toml"], HEALTH_PORT
        )
        service["hostname"] = p.name
        # no `ports`: Raft stays on the compose network
        service["expose"] = [str(GRPC_PORT), str(RAFT_PORT), str(HEALTH_PORT)]
        service["volumes"] = [config_volume, f"{p.name}-data:{DATA_MOUNT}"]
        service["secrets"] = [
            {"source": f"raft-shard-{p.shard}", "target": f"{SECRETS_MOUNT}/{secret_file_name(p.shard)}"}
        ]
        services[p.name] = service
        volumes[f"{p.name}-data"] = {}
    router = _compose_service(
        opts.image, ["router", "--cluster", CONFIG_MOUNT, "--listen", f"0.0.0.0:{ROUTER_PORT}"], ROUTER_PORT
    )
    # Published on the host's loopback only: the router speaks plain, unauthenticated gRPC.
    router["ports"] = [f"127.0.0.1:{ROUTER_PORT}:{ROUTER_PORT}"]
    router["volumes"] = [config_volume]
    router["depends_on"] = list(services)
    services["router"] = router
    # Compose mounts each file read-only into the services that name it (the router needs none).
    secrets = {
        f"raft-shard-{members[0].shard}": {
            "file": f"./{COMPOSE_SECRETS_DIR}/{secret_file_name(members[0].shard)}"
        }
        for members in layout
    }
    return {"name": APP, "services": services, "volumes": volumes, "secrets": secrets}


def render_compose(opts: Options) -> dict[str, str]:
    layout = compose_layout(opts.shards, opts.replicas)
    cluster_map, configs = build(
        layout, f"{CONFIG_MOUNT}/cluster.json", opts.vnodes, parse_settings(opts.settings)
    )
    files = {
        f"{COMPOSE_CONFIG_DIR}/{path}": text for path, text in config_files(cluster_map, configs).items()
    }
    files["docker-compose.yml"] = _header(opts, "compose") + to_yaml(compose_file(layout, opts))
    return files


# ----- Kubernetes --------------------------------------------------------------------------------


def _labels(component: str, shard: int | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}
    if shard is not None:
        labels[SHARD_LABEL] = str(shard)
    return labels


def _meta(name: str, opts: Options, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": opts.namespace}
    if labels:
        meta["labels"] = labels
    return meta


def configmap_key(path: str) -> str:
    """ConfigMap keys cannot contain '/': nodes/<pod>.toml is stored as <pod>.toml."""
    return path.rsplit("/", 1)[-1]


def configmap(files: dict[str, str], opts: Options) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(f"{APP}-config", opts, {"app.kubernetes.io/name": APP}),
        "data": {configmap_key(path): text for path, text in files.items()},
    }


def _config_volume(paths: Iterable[str]) -> dict[str, Any]:
    # items puts each key back at its path under the mount: cluster.json, nodes/<pod>.toml.
    items = [{"key": configmap_key(path), "path": path} for path in paths]
    return {"name": "config", "configMap": {"name": f"{APP}-config", "items": items}}


def _security(pod: bool) -> dict[str, Any]:
    if pod:  # fsGroup makes the PersistentVolume writable by the image's non-root user
        return {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _grpc_probe(port: int, period: int, failures: int, service: str = "") -> dict[str, Any]:
    """kubelet's native gRPC probe (grpc.health.v1; a port number, never a name; no client certificate)."""
    grpc = {"port": port, "service": service} if service else {"port": port}
    return {"grpc": grpc, "periodSeconds": period, "timeoutSeconds": 3, "failureThreshold": failures}


def _node_probes() -> dict[str, Any]:
    return {
        # Up to 5 minutes to replay the journal or load a snapshot before the other probes count.
        "startupProbe": _grpc_probe(HEALTH_PORT, period=2, failures=150),
        # Out of the Service while stuck or while storage refuses writes.
        "readinessProbe": _grpc_probe(HEALTH_PORT, period=5, failures=2),
        # Restarted only when stuck (tick thread or applies) for a minute: "liveness" leaves storage
        # out, since a restart cannot make room on a full disk.
        "livenessProbe": _grpc_probe(HEALTH_PORT, period=10, failures=6, service="liveness"),
    }


def headless_service(shard: int, opts: Options) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(statefulset_name(shard), opts, _labels("node", shard)),
        "spec": {
            "clusterIP": "None",
            # Peers must resolve each other before they are Ready (a shard without a leader serves
            # nothing useful, and its replicas elect one over these very names).
            "publishNotReadyAddresses": True,
            "selector": _labels("node", shard),
            "ports": [
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"},
                {"name": "raft", "port": RAFT_PORT, "targetPort": "raft"},
                {"name": "health", "port": HEALTH_PORT, "targetPort": "health"},
            ],
        },
    }


def _node_container(opts: Options) -> dict[str, Any]:
    return {
        "name": "node",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        # The pod's own name picks its config: pods are <statefulset>-<ordinal>, as are the files.
        "args": ["node", "--config", f"{CONFIG_MOUNT}/nodes/$(POD_NAME).toml"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT},
            {"name": "raft", "containerPort": RAFT_PORT},
            {"name": "health", "containerPort": HEALTH_PORT},
        ],
        **_node_probes(),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": _security(pod=False),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "raft-secret", "mountPath": SECRETS_MOUNT, "readOnly": True},
            {"name": "data", "mountPath": DATA_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _secret_volume(shard: int) -> dict[str, Any]:
    # Group-readable for the pod's fsGroup (the image's user), nobody else.
    items = [{"key": "raft.key", "path": secret_file_name(shard)}]
    return {
        "name": "raft-secret",
        "secret": {"secretName": secret_name(shard), "defaultMode": 0o440, "items": items},
    }


def _config_checksum(files: dict[str, str], paths: list[str]) -> dict[str, str]:
    """A pod-template annotation that changes with the pod's config files, so that applying re-rendered
    settings rolls the pods one at a time (a ConfigMap change alone restarts nothing)."""
    digest = hashlib.sha256("".join(f"{path}\n{files[path]}" for path in paths).encode()).hexdigest()
    return {CHECKSUM_ANNOTATION: digest}


def statefulset(members: list[Placement], files: dict[str, str], opts: Options) -> dict[str, Any]:
    shard = members[0].shard
    labels = _labels("node", shard)
    paths = ["cluster.json", *(f"nodes/{p.name}.toml" for p in members)]
    annotations = _config_checksum(files, paths)
    # Spread a shard's replicas over machines: two on one machine lose the majority together.
    term = {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}
    spread = {"weight": 100, "podAffinityTerm": term}
    pod_spec = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": _security(pod=True),
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [spread]}},
        "containers": [_node_container(opts)],
        "volumes": [_config_volume(paths), _secret_volume(shard), {"name": "tmp", "emptyDir": {}}],
    }
    claim = {
        "metadata": {"name": "data", "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": opts.storage}}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(statefulset_name(shard), opts, labels),
        "spec": {
            "serviceName": statefulset_name(shard),
            "replicas": len(members),  # never `kubectl scale` it: membership is fixed in the configs
            # Start replicas together: OrderedReady starts pod N+1 only once pod N is Ready, which is slow
            # and would deadlock if readiness ever meant "has a leader" (a lone replica cannot elect one).
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
            "volumeClaimTemplates": [claim],
        },
    }


def disruption_budget(shard: int, opts: Options) -> dict[str, Any]:
    """Voluntary evictions (node drains, upgrades) take at most one replica of a shard at a time."""
    labels = _labels("node", shard)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(statefulset_name(shard), opts, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }


def router_manifests(files: dict[str, str], opts: Options) -> list[dict[str, Any]]:
    labels = _labels("router")
    container = {
        "name": "router",
        "image": opts.image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["router", "--cluster", CONFIG_MOUNT, "--listen", f"0.0.0.0:{ROUTER_PORT}"],
        "ports": [{"name": "grpc", "containerPort": ROUTER_PORT}],
        "readinessProbe": _grpc_probe(ROUTER_PORT, period=5, failures=2),
        "livenessProbe": _grpc_probe(ROUTER_PORT, period=10, failures=6),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": _security(pod=False),
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(f"{APP}-router", opts, labels),
        "spec": {
            "replicas": opts.router_replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": _config_checksum(files, ["cluster.json"])},
                "spec": {
                    "enableServiceLinks": False,
                    "securityContext": _security(pod=True),
                    "containers": [container],
                    "volumes": [_config_volume(["cluster.json"])],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(f"{APP}-router", opts, labels),
        "spec": {"selector": labels, "ports": [{"name": "grpc", "port": ROUTER_PORT, "targetPort": "grpc"}]},
    }
    return [deployment, service]


def network_policy(shard: int, opts: Options) -> dict[str, Any]:
    """Raft ingress only from the same shard's pods; gRPC stays open to clients and the router, and
    health to the kubelet's probes."""
    labels = _labels("node", shard)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(f"{statefulset_name(shard)}-raft", opts, labels),
        "spec": {
            "podSelector": {"matchLabels": labels},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": labels}}],
                    "ports": [{"protocol": "TCP", "port": RAFT_PORT}],
                },
                {"ports": [{"protocol": "TCP", "port": GRPC_PORT}, {"protocol": "TCP", "port": HEALTH_PORT}]},
            ],
        },
    }


def k8s_documents(opts: Options) -> dict[str, list[dict[str, Any]]]:
    """File name -> the manifests in it."""
    layout = k8s_layout(opts.shards, opts.replicas, opts.namespace, opts.cluster_domain)
    cluster_map, configs = build(
        layout, f"{CONFIG_MOUNT}/cluster.json", opts.vnodes, parse_settings(opts.settings)
    )
    files = config_files(cluster_map, configs)
    docs: dict[str, list[dict[str, Any]]] = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": opts.namespace}}],
        "configmap.yaml": [configmap(files, opts)],
    }
    for members in layout:
        shard = members[0].shard
        docs[f"shard-{shard}.yaml"] = [
            headless_service(shard, opts),
            statefulset(members, files, opts),
            disruption_budget(shard, opts),
        ]
    docs["router.yaml"] = router_manifests(files, opts)
    docs["networkpolicy.yaml"] = [network_policy(members[0].shard, opts) for members in layout]
    return docs


def render_k8s(opts: Options) -> dict[str, str]:
    docs = k8s_documents(opts)
    files = {name: _header(opts, "k8s") + yaml_documents(manifests) for name, manifests in docs.items()}
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(docs),
    }
    files["kustomization.yaml"] = _header(opts, "k8s") + to_yaml(kustomization)
    return files


# ----- YAML (block style; strings quoted unless plainly safe) ------------------------------------

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
# YAML 1.1 (what Kubernetes and compose parsers follow) reads these plain words as booleans or null.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _inline(value: Any) -> str:
    if isinstance(value, dict | list):
        assert not value, "only empty collections are written inline"
        return "{}" if isinstance(value, dict) else "[]"
    return _scalar(value)


def _flow(value: Any) -> str:
    """A short list of scalars on one line, as JSON (which YAML reads the same way): `["a", 1]`."""
    if not isinstance(value, list) or not value or any(isinstance(v, dict | list | bool) for v in value):
        return ""
    return json.dumps(value)


def _literal(value: Any) -> bool:
    """Multi-line text (TOML, JSON) is written as a `|` block so the ConfigMap stays readable. Only text
    that such a block reproduces exactly: one final newline, no leading space, nothing unprintable."""
    if not isinstance(value, str) or not value.endswith("\n") or value.endswith("\n\n"):
        return False
    return (
        "\n" in value[:-1]
        and not value.startswith(" ")
        and all(c.isprintable() for c in value[:-1].split("\n"))
    )


def _value_lines(prefix: str, value: Any, indent: int) -> list[str]:
    """`prefix` is `key:` or `-`; nested blocks are indented two spaces more than `indent`."""
    head = " " * indent + prefix
    flow = _flow(value)
    if flow and len(head) + len(flow) < 100:
        return [f"{head} {flow}"]
    if isinstance(value, dict | list) and value:
        nested = _block(value, indent + 2)
        if prefix == "-" and isinstance(value, dict):  # a mapping in a list starts on the dash's line
            return [f"{head} {nested[0].lstrip()}", *nested[1:]]
        return [head, *nested]
    if _literal(value):
        pad = " " * (indent + 2)
        return [f"{head} |", *(f"{pad}{line}" if line else "" for line in value.splitlines())]
    return [f"{head} {_inline(value)}"]


def _block(value: dict[str, Any] | list[Any], indent: int) -> list[str]:
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            lines += _value_lines(f"{_scalar(key)}:", item, indent)
    else:
        for item in value:
            lines += _value_lines("-", item, indent)
    return lines


def to_yaml(value: dict[str, Any]) -> str:
    return "\n".join(_block(value, 0)) + "\n"


def yaml_documents(documents: list[dict[str, Any]]) -> str:
    return "---\n".join(to_yaml(doc) for doc in documents)


def _header(opts: Options, target: str) -> str:
    return (
        "# Generated by deploy/render.py: do not edit by hand; change render.py or its options and run\n"
        f"#   {opts.command_line(target)}\n"
    )


# ----- command line ------------------------------------------------------------------------------

# Files a render owns in its output directory: stale ones (a shard that no longer exists) are removed.
_GENERATED = {"compose": [f"{COMPOSE_CONFIG_DIR}/nodes/*.toml"], "k8s": ["shard-*.yaml"]}
DEFAULT_OUT = {"compose": DEPLOY_DIR, "k8s": DEPLOY_DIR / "k8s"}


def render(target: str, opts: Options) -> dict[str, str]:
    """Relative path -> file content, for `target` ("compose" or "k8s")."""
    if opts.shards < 1 or opts.replicas < 1:
        raise ValueError("--shards and --replicas must be at least 1")
    return render_compose(opts) if target == "compose" else render_k8s(opts)


def write(out: Path, files: dict[str, str], target: str) -> None:
    for pattern in _GENERATED[target]:
        for stale in out.glob(pattern):
            if stale.relative_to(out).as_posix() not in files:
                stale.unlink()
    for path, text in files.items():
        dest = out / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)


def parse_args(argv: list[str] | None) -> tuple[str, Options, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", choices=["compose", "k8s"])
    defaults = Options()
    parser.add_argument("--shards", type=int, default=defaults.shards)
    parser.add_argument("--replicas", type=int, default=defaults.replicas, help="per shard (3 or 5)")
    parser.add_argument("--vnodes", type=int, default=defaults.vnodes)
    parser.add_argument("--image", default=defaults.image)
    parser.add_argument("--namespace", default=defaults.namespace, help="k8s: baked into every DNS name")
    parser.add_argument("--cluster-domain", default=defaults.cluster_domain, help="k8s")
    parser.add_argument("--storage", default=defaults.storage, help="k8s: PersistentVolumeClaim size")
    parser.add_argument("--router-replicas", type=int, default=defaults.router_replicas, help="k8s")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a node setting, e.g. --set raft.min_timeout=1.2 --set storage.fsync=false",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: deploy/ (compose), deploy/k8s/ (k8s)"
    )
    args = parser.parse_args(argv)
    opts = Options(
        shards=args.shards,
        replicas=args.replicas,
        vnodes=args.vnodes,
        image=args.image,
        namespace=args.namespace,
        cluster_domain=args.cluster_domain,
        storage=args.storage,
        router_replicas=args.router_replicas,
        settings=tuple(args.settings),
    )
    return args.target, opts, args.out or DEFAULT_OUT[args.target]


def main(argv: list[str] | None = None) -> int:
    target, opts, out = parse_args(argv)
    try:
        files = render(target, opts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write(out, files, target)
    print(f"wrote {len(files)} file(s) under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
