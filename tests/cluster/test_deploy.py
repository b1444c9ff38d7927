"""deploy/: what render.py writes for docker compose and Kubernetes loads as kvstore's own configs, every
name matches the service or pod that uses it, the committed files are what render.py produces, and a
shard addressed by DNS names (as in a container network) elects a leader and serves clients.

Docker and a Kubernetes API server are not available here: images and manifests are checked
statically (the Dockerfile's paths, the manifests' structure), never run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvstore import Client
from kvstore.cluster.local import LocalCluster, free_ports
from kvstore.config import NodeConfig
from kvstore.routing.cluster_map import ClusterMap
from kvstore.server import health
from tests.conftest import stop_process, wait_until

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvstore_deploy_render", DEPLOY / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


render = _load_render()


# ----- a minimal YAML reader for the block style render.py writes (PyYAML is not a dependency) -----

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")


def _yaml_scalar(text: str) -> Any:
    if text.startswith(('"', "[")):
        return json.loads(text)  # double-quoted scalars and flow lists are written as JSON
    if text == "{}":
        return {}
    # YAML 1.1 (Kubernetes, compose) reads these plain words as booleans or null, whatever their case.
    words = {"true": True, "yes": True, "y": True, "on": True, "false": False, "no": False, "n": False}
    words |= {"off": False, "null": None, "~": None}
    if text.lower() in words:
        return words[text.lower()]
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    assert _PLAIN_KEY.fullmatch(text), f"unsupported YAML scalar {text!r}"
    return text


class MiniYaml:
    """Mappings, sequences, plain/double-quoted scalars, JSON flow lists, `|` blocks, comments, `---`.
    Anything else fails, so the test notices if render.py starts writing YAML this cannot vouch for."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.i = 0

    @classmethod
    def documents(cls, text: str) -> list[Any]:
        docs: list[list[str]] = [[]]
        for line in text.split("\n"):
            if line == "---":
                docs.append([])
            else:
                docs[-1].append(line)
        return [cls(lines).document() for lines in docs]

    def document(self) -> Any:
        self._skip()
        value = self._node(self._indent())
        self._skip()
        assert self.i == len(self.lines), f"unparsed YAML at line {self.i + 1}: {self.lines[self.i]!r}"
        return value

    def _skip(self) -> None:
        while self.i < len(self.lines) and (
            not self.lines[self.i].strip() or self.lines[self.i].lstrip().startswith("#")
        ):
            self.i += 1

    def _indent(self) -> int:
        line = self.lines[self.i]
        return len(line) - len(line.lstrip(" "))

    def _at(self, indent: int) -> str | None:
        """The current line's text if it is at exactly this indentation, else None."""
        self._skip()
        if self.i >= len(self.lines) or self._indent() < indent:
            return None
        assert self._indent() == indent, f"bad indentation at line {self.i + 1}: {self.lines[self.i]!r}"
        return self.lines[self.i][indent:]

    def _node(self, indent: int) -> Any:
        text = self._at(indent)
        assert text is not None
        return self._sequence(indent) if text == "-" or text.startswith("- ") else self._mapping(indent)

    def _mapping(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (text := self._at(indent)) is not None and not text.startswith("-"):
            key, rest = _split_key(text)
            assert key not in out, f"duplicate key {key!r}"
            out[key] = self._value(rest, indent)
        return out

    def _sequence(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while (text := self._at(indent)) is not None and (text == "-" or text.startswith("- ")):
            rest = text[1:].strip()
            if _is_entry(rest):  # "- key: value" starts a mapping indented by the dash
                self.lines[self.i] = " " * (indent + 2) + rest
                out.append(self._mapping(indent + 2))
            else:
                out.append(self._value(rest, indent))
        return out

    def _value(self, rest: str, indent: int) -> Any:
        self.i += 1
        if rest == "":
            self._skip()
            assert self.i < len(self.lines) and self._indent() > indent, "empty value"
            return self._node(self._indent())
        if rest == "|":
            return self._literal(indent)
        return _yaml_scalar(rest)

    def _literal(self, indent: int) -> str:
        body = []
        while self.i < len(self.lines) and (not self.lines[self.i].strip() or self._indent() > indent):
            body.append(self.lines[self.i])
            self.i += 1
        while body and not body[-1].strip():
            body.pop()  # `|` clips trailing blank lines to one newline
        width = min(len(line) - len(line.lstrip(" ")) for line in body if line.strip())
        return "\n".join(line[width:] for line in body) + "\n"


def _split_key(text: str) -> tuple[str, str]:
    if text.startswith('"'):
        key, end = json.JSONDecoder().raw_decode(text)
        rest = text[end:]
    else:
        key, colon, rest = text.partition(":")
        rest = colon + rest
        assert _PLAIN_KEY.fullmatch(key), f"unsupported YAML key {key!r}"
    assert rest == ":" or rest.startswith(": "), f"not a mapping entry: {text!r}"
    return key, rest[1:].strip()


def _is_entry(text: str) -> bool:
    try:
        _split_key(text)
    except (AssertionError, ValueError):
        return False
    return True


def parse_yaml(text: str) -> list[Any]:
    """Every document, read by MiniYaml and, when PyYAML happens to be installed, by PyYAML too."""
    documents = MiniYaml.documents(text)
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return documents
    assert list(yaml.safe_load_all(text)) == documents
    return documents


# ----- helpers -----------------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_cluster(cluster_map: ClusterMap, nodes: dict[str, NodeConfig]) -> None:
    """Every replica: binds all interfaces, advertises its DNS name, peers = the rest of its shard."""
    names = [r.name for s in cluster_map.shards for r in s.replicas]
    assert sorted(names) == sorted(nodes), "one node config per replica in the cluster map"
    raft_addresses = [r.raft_address for s in cluster_map.shards for r in s.replicas]
    assert len(set(raft_addresses)) == len(raft_addresses)
    for shard in cluster_map.shards:
        for replica in shard.replicas:
            config = nodes[replica.name]
            host, grpc_port = _host_port(replica.address)
            raft_host, raft_port = _host_port(replica.raft_address)
            assert host == raft_host and not _is_ip(host), replica
            assert config.name == replica.name and config.shard == shard.id
            assert config.listen == f"0.0.0.0:{grpc_port}"
            assert config.raft_bind == f"0.0.0.0:{raft_port}"
            assert config.raft_advertise == replica.raft_address
            others = [r.raft_address for r in shard.replicas if r.name != replica.name]
            assert sorted(config.peers) == sorted(others)
            assert config.data_dir == render.DATA_MOUNT


def _docs_by_kind(docs: dict[str, list[Any]]) -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for manifests in docs.values():
        for manifest in manifests:
            by_kind.setdefault(manifest["kind"], []).append(manifest)
    return by_kind


def _mount_configmap(configmap: dict[str, Any], volume: dict[str, Any], root: Path) -> Path:
    """Lay the ConfigMap's items out as the kubelet would under a pod's mount point."""
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    for item in volume["configMap"]["items"]:
        dest = root / item["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(configmap["data"][item["key"]])
    return root


def _in_mount(path: str, mount_path: str, host_root: Path) -> Path:
    assert path.startswith(mount_path + "/"), f"{path} is not under {mount_path}"
    return host_root / path[len(mount_path) + 1 :]


# ----- docker compose ----------------------------------------------------------------------------


def test_compose_render_loads_and_names_match(tmp_path: Path) -> None:
    assert render.main(["compose", "--shards", "2", "--replicas", "3", "--out", str(tmp_path)]) == 0
    compose = parse_yaml((tmp_path / "docker-compose.yml").read_text())[0]
    services = dict(compose["services"])
    router = services.pop("router")
    config_dir = tmp_path / render.COMPOSE_CONFIG_DIR
    cluster_map = ClusterMap.load(config_dir / "cluster.json")
    nodes = {p.stem: NodeConfig.load(p) for p in (config_dir / "nodes").glob("*.toml")}
    assert len(nodes) == 6 and sorted(services) == sorted(nodes)
    check_cluster(cluster_map, nodes)
    mount = f"./{render.COMPOSE_CONFIG_DIR}:{render.CONFIG_MOUNT}:ro"
    for shard in cluster_map.shards:
        for replica in shard.replicas:
            name, service = replica.name, services[replica.name]
            # The service name is the DNS name Docker resolves: the map must use exactly it.
            assert replica.address == f"{name}:{render.GRPC_PORT}"
            assert replica.raft_address == f"{name}:{render.RAFT_PORT}"
            assert service["command"] == ["node", "--config", f"{render.CONFIG_MOUNT}/nodes/{name}.toml"]
            assert _in_mount(service["command"][2], render.CONFIG_MOUNT, config_dir) == config_dir / (
                f"nodes/{name}.toml"
            )
            assert _in_mount(nodes[name].cluster_map, render.CONFIG_MOUNT, config_dir).exists()
            assert service["volumes"] == [mount, f"{name}-data:{render.DATA_MOUNT}"]
            assert f"{name}-data" in compose["volumes"]
            assert "ports" not in service, "node ports (Raft!) must not be published on the host"
            # grpc.health.v1 through `kvstore health` (tests/cluster/test_health.py checks its exit codes).
            health_address = f"127.0.0.1:{render.HEALTH_PORT}"
            assert service["healthcheck"]["test"] == ["CMD", "kvstore", "health", "--address", health_address]
            assert nodes[name].health_listen == f"0.0.0.0:{render.HEALTH_PORT}"
    assert router["command"] == ["router", "--cluster", render.CONFIG_MOUNT, "--listen", "0.0.0.0:7400"]
    assert router["volumes"] == [mount]
    assert router["ports"] == ["127.0.0.1:7400:7400"]
    assert router["healthcheck"]["test"][-2:] == ["--address", "127.0.0.1:7400"]
    assert sorted(router["depends_on"]) == sorted(nodes)
    assert {s["image"] for s in compose["services"].values()} == {render.DEFAULT_IMAGE}
    assert {s["pull_policy"] for s in compose["services"].values()} == {"never"}


def test_rerender_removes_stale_node_configs(tmp_path: Path) -> None:
    assert render.main(["compose", "--shards", "2", "--replicas", "3", "--out", str(tmp_path)]) == 0
    assert render.main(["compose", "--shards", "1", "--replicas", "3", "--out", str(tmp_path)]) == 0
    left = sorted(p.stem for p in (tmp_path / render.COMPOSE_CONFIG_DIR / "nodes").glob("*.toml"))
    assert left == ["s0r0", "s0r1", "s0r2"]
    assert render.main(["k8s", "--shards", "3", "--out", str(tmp_path / "k")]) == 0
    assert render.main(["k8s", "--shards", "1", "--out", str(tmp_path / "k")]) == 0
    assert sorted(p.name for p in (tmp_path / "k").glob("shard-*.yaml")) == ["shard-0.yaml"]


def test_set_overrides_node_settings_and_rejects_unknown_ones(tmp_path: Path) -> None:
    args = ["compose", "--shards", "1", "--out", str(tmp_path)]
    extra = ["--set", "raft.min_timeout=1.25", "--set", 'storage.durability="none"']
    assert render.main([*args, *extra]) == 0
    for path in (tmp_path / render.COMPOSE_CONFIG_DIR / "nodes").glob("*.toml"):
        config = NodeConfig.load(path)
        assert config.raft.min_timeout == 1.25 and config.storage.durability == "none"
        assert config.raft.max_timeout == NodeConfig.from_dict(_identity()).raft.max_timeout
    assert "--set raft.min_timeout=1.25" in (tmp_path / "docker-compose.yml").read_text()
    for bad in ("raft.no_such_setting=1", "name=x", "listen.x=1", "raft.min_timeout=not-toml"):
        assert render.main([*args, "--set", bad]) == 2, bad


def _identity() -> dict[str, Any]:
    fields = {"name": "x", "shard": 0, "listen": "", "raft_bind": "", "raft_advertise": "", "peers": []}
    return {**fields, "data_dir": "", "cluster_map": ""}


# ----- Kubernetes --------------------------------------------------------------------------------


def _k8s_render(tmp_path: Path) -> dict[str, list[Any]]:
    args = ["k8s", "--shards", "2", "--replicas", "3", "--namespace", "kv-test"]
    args += ["--cluster-domain", "example.internal", "--out", str(tmp_path / "k8s")]
    assert render.main(args) == 0
    return {p.name: parse_yaml(p.read_text()) for p in sorted((tmp_path / "k8s").glob("*.yaml"))}


def test_k8s_render_loads_and_pod_names_match(tmp_path: Path) -> None:
    docs = _k8s_render(tmp_path)
    kustomization = docs.pop("kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(docs)
    by_kind = _docs_by_kind(docs)
    assert by_kind["Namespace"][0]["metadata"]["name"] == "kv-test"
    for kind, manifests in by_kind.items():
        if kind != "Namespace":
            assert {m["metadata"]["namespace"] for m in manifests} == {"kv-test"}, kind
    (configmap,) = by_kind["ConfigMap"]
    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    nodes: dict[str, NodeConfig] = {}
    maps = []
    for sts in by_kind["StatefulSet"]:
        nodes.update(_check_statefulset(sts, services[sts["spec"]["serviceName"]], configmap, tmp_path))
        maps.append(ClusterMap.load(tmp_path / "mnt" / sts["metadata"]["name"] / "cluster.json"))
    assert len(nodes) == 6 and all(m == maps[0] for m in maps)
    check_cluster(maps[0], nodes)


def _check_statefulset(
    sts: dict[str, Any], service: dict[str, Any], configmap: dict[str, Any], tmp_path: Path
) -> dict[str, NodeConfig]:
    spec, name = sts["spec"], sts["metadata"]["name"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # The headless Service gives each pod its stable DNS name, before it is Ready.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": render.GRPC_PORT, "raft": render.RAFT_PORT, "health": render.HEALTH_PORT}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    # kubelet's gRPC probes (grpc.health.v1) on the plaintext health port: a number, not a port name.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == render.HEALTH_PORT, probe
    assert "service" not in container["readinessProbe"]["grpc"]  # overall health: storage included
    # Liveness asks only "stuck?": a restart cannot make room on a full disk.
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    pod_name_env = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert container["env"] == [pod_name_env]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert [c["metadata"]["name"] for c in spec["volumeClaimTemplates"]] == ["data"]
    assert mounts["data"] == render.DATA_MOUNT
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    root = _mount_configmap(configmap, config_volume, tmp_path / "mnt" / name)
    nodes = {}
    domain = f"{service['metadata']['name']}.kv-test.svc.example.internal"
    for ordinal in range(spec["replicas"]):
        pod_name = f"{name}-{ordinal}"  # how a StatefulSet names its pods
        # Kubernetes expands $(POD_NAME) in args from the env var set by the downward API.
        args = [a.replace("$(POD_NAME)", pod_name) for a in container["args"]]
        assert args[:2] == ["node", "--config"]
        config = NodeConfig.load(_in_mount(args[2], mounts["config"], root))
        assert config.name == pod_name
        assert config.raft_advertise == f"{pod_name}.{domain}:{render.RAFT_PORT}"
        assert config.health_listen == f"0.0.0.0:{render.HEALTH_PORT}"
        assert _in_mount(config.cluster_map, mounts["config"], root).exists()
        nodes[pod_name] = config
    return nodes


def test_k8s_network_policy_confines_raft_to_its_shard(tmp_path: Path) -> None:
    by_kind = _docs_by_kind(_k8s_render(tmp_path))
    policies = by_kind["NetworkPolicy"]
    statefulsets = by_kind["StatefulSet"]
    assert len(policies) == len(statefulsets) == 2
    for sts in statefulsets:
        pods = sts["spec"]["template"]["metadata"]["labels"]
        selects = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pods.items()]
        assert len(selects) == 1, "exactly one policy per shard's pods"
        (policy,) = selects
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        raft_rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 7001} in r["ports"]]
        assert len(raft_rules) == 1 and len(raft_rules[0]["ports"]) == 1
        (peer,) = raft_rules[0]["from"]
        assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"] == pods
        others = [s for s in statefulsets if s is not sts]
        for other in others:  # the selector really tells shards apart
            other_pods = other["spec"]["template"]["metadata"]["labels"]
            assert not peer["podSelector"]["matchLabels"].items() <= other_pods.items()
        open_ports = [p for r in policy["spec"]["ingress"] if "from" not in r for p in r["ports"]]
        assert {p["port"] for p in open_ports} == {render.GRPC_PORT, render.HEALTH_PORT}
    budgets = by_kind["PodDisruptionBudget"]
    assert sorted(b["spec"]["maxUnavailable"] for b in budgets) == [1, 1]


def test_k8s_router_and_config_rollout(tmp_path: Path) -> None:
    docs = _k8s_render(tmp_path)
    by_kind = _docs_by_kind(docs)
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"] == ["router", "--cluster", render.CONFIG_MOUNT, "--listen", "0.0.0.0:7400"]
    assert container["readinessProbe"]["grpc"] == container["livenessProbe"]["grpc"] == {"port": 7400}
    (volume,) = pod["spec"]["volumes"]
    assert [i["path"] for i in volume["configMap"]["items"]] == ["cluster.json"]
    (service,) = [s for s in by_kind["Service"] if s["metadata"]["name"] == "kvstore-router"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    assert service["spec"]["ports"][0]["port"] == render.ROUTER_PORT
    # The pod-template checksum follows the config a pod mounts: a changed setting rolls the pods.
    (configmap,) = by_kind["ConfigMap"]
    router_sum = pod["metadata"]["annotations"][render.CHECKSUM_ANNOTATION]
    cluster_json = configmap["data"]["cluster.json"]
    assert router_sum == hashlib.sha256(f"cluster.json\n{cluster_json}".encode()).hexdigest()
    args = ["k8s", "--shards", "2", "--namespace", "kv-test", "--cluster-domain", "example.internal"]
    changed = _docs_by_kind(render.k8s_documents(render.parse_args([*args, "--vnodes", "64"])[1]))
    for before, after in zip(by_kind["StatefulSet"], changed["StatefulSet"], strict=True):
        key = render.CHECKSUM_ANNOTATION
        assert (
            before["spec"]["template"]["metadata"]["annotations"][key]
            != (after["spec"]["template"]["metadata"]["annotations"][key])
        )


# ----- the committed files -----------------------------------------------------------------------


@pytest.mark.parametrize("target", ["compose", "k8s"])
def test_committed_files_are_what_render_produces(target: str) -> None:
    out = render.DEFAULT_OUT[target]
    expected = render.render(target, render.Options())
    hint = f"stale: run `python deploy/render.py {target}`"
    for path, text in expected.items():
        assert (out / path).exists(), f"{out / path} missing ({hint})"
        assert (out / path).read_text() == text, f"{out / path} differs ({hint})"
    if target == "compose":
        committed = {p.relative_to(out).as_posix() for p in (out / render.COMPOSE_CONFIG_DIR).rglob("*.*")}
        committed.add("docker-compose.yml")
    else:
        committed = {p.name for p in out.iterdir()}
    assert committed == set(expected), f"files render.py does not produce ({hint})"


def test_committed_yaml_parses_to_what_render_built() -> None:
    opts = render.Options()
    compose = parse_yaml((DEPLOY / "docker-compose.yml").read_text())
    assert compose == [render.compose_file(render.compose_layout(opts.shards, opts.replicas), opts)]
    for name, manifests in render.k8s_documents(opts).items():
        assert parse_yaml((DEPLOY / "k8s" / name).read_text()) == manifests, name
    kustomization = parse_yaml((DEPLOY / "k8s" / "kustomization.yaml").read_text())[0]
    assert kustomization["kind"] == "Kustomization"


def test_raft_secret_comes_from_a_secret_never_the_configmap(tmp_path: Path) -> None:
    """Every node config names its shard's secret file under the secrets mount; the file comes from a
    per-shard Kubernetes Secret or compose secret; no rendered file holds a secret or a password."""
    by_kind = _docs_by_kind(_k8s_render(tmp_path))
    (configmap,) = by_kind["ConfigMap"]
    assert not any("password" in text for text in configmap["data"].values())
    for sts in by_kind["StatefulSet"]:
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["raft-secret"] == {
            "name": "raft-secret",
            "mountPath": render.SECRETS_MOUNT,
            "readOnly": True,
        }
        (volume,) = [v for v in pod["volumes"] if v["name"] == "raft-secret"]
        shard = int(sts["metadata"]["labels"][render.SHARD_LABEL])
        assert volume["secret"]["secretName"] == render.secret_name(shard)
        assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
        (item,) = volume["secret"]["items"]
        for key in configmap["data"]:
            if key.startswith(sts["metadata"]["name"] + "-"):
                config = NodeConfig.from_dict(tomllib.loads(configmap["data"][key]))
                assert config.raft.secret_file == f"{render.SECRETS_MOUNT}/{item['path']}"
                assert config.shard == shard and not config.raft.insecure
    assert render.main(["compose", "--shards", "2", "--out", str(tmp_path / "c")]) == 0
    compose = parse_yaml((tmp_path / "c" / "docker-compose.yml").read_text())[0]
    for name, service in compose["services"].items():
        if name == "router":
            assert "secrets" not in service
            continue
        config = NodeConfig.load(tmp_path / "c" / render.COMPOSE_CONFIG_DIR / "nodes" / f"{name}.toml")
        (secret,) = service["secrets"]
        assert secret["target"] == config.raft.secret_file
        assert compose["secrets"][secret["source"]] == {"file": f"./secrets/shard-{config.shard}.key"}
    for path in [*(tmp_path / "c").rglob("*.*"), *(tmp_path / "k8s").glob("*")]:
        assert "password" not in path.read_text(), path


def test_yaml_emitter_quotes_what_yaml_would_misread() -> None:
    scalars = ["yes", "No", "on", "OFF", "true", "null", "y", "N", "~", "", "7000", "0.0.0.0", "1e3", "0x10"]
    scalars += ["-1", "a: b", "#x", "- x", "x #y", "[x]", "{x}", "*x", "&x", "!x", "%x", "@x", "`x", "'x'"]
    tricky = {
        "as_values": {f"k{i}": s for i, s in enumerate(scalars)},
        "as_keys": {s: i for i, s in enumerate(scalars)},
        "as_block_list": [*scalars, "z" * 100],  # too long for one line: written as a block
        "as_flow_list": scalars[:4],
        "text": "line one\n\n  indented: [x]\nlast\n",
        "no_final_newline": "a\nb",
        "nested": [[1, [2, {"k": []}]], {"a": {}, "b": [{"c": "d"}]}],
        "ints": [0, -3, 10**12],
        "bools": [True, False, None],
    }
    text = render.to_yaml(tricky)
    assert "- yes" not in text and "k0: yes" not in text  # quoted, not left to the reader
    assert parse_yaml(text) == [tricky]
    assert parse_yaml(render.yaml_documents([{"a": 1}, {"b": [2]}])) == [{"a": 1}, {"b": [2]}]


# ----- the image ---------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_paths_user_ports_and_entrypoint() -> None:
    instructions = _dockerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, arg in instructions:
        by_name.setdefault(name, []).append(arg)
    assert all(arg.split()[0] == "python:3.11-slim" for arg in by_name["FROM"])
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    sources = []
    for arg in by_name["COPY"]:
        if arg.startswith("--from"):
            continue
        *srcs, _dest = arg.split()
        sources += srcs
    assert sources, "the build copies the project in"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the build context (the repository root)"
        assert src.rstrip("/") in allowed, f"COPY {src}: excluded by Dockerfile.dockerignore"
    assert any("pip install ." in arg for arg in by_name["RUN"])
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["kvstore"]
    assert "kvstore" in pyproject["project"]["scripts"]
    assert "README.md" in sources and pyproject["project"]["readme"] == "README.md"
    user = by_name["USER"][-1].split(":")[0]
    assert user not in ("root", "0") and int(user) == render._security(pod=True)["runAsUser"]
    assert json.loads(by_name["VOLUME"][-1]) == [render.DATA_MOUNT]
    exposed = {int(p) for arg in by_name["EXPOSE"] for p in arg.split()}
    assert exposed == {render.GRPC_PORT, render.RAFT_PORT, render.HEALTH_PORT, render.ROUTER_PORT}


# ----- a shard whose replicas know each other only by DNS name -----------------------------------


def test_dns_named_shard_elects_and_serves(tmp_path: Path) -> None:
    """The container layouts' one new ingredient, run for real: Raft identities and client addresses
    are host names (here `localhost`, with distinct ports), not IPs. Bound to 127.0.0.1 on this machine."""
    ports = free_ports(10)
    layout = [
        [
            render.Placement(
                0,
                f"n{r}",
                "localhost",
                grpc_port=ports[2 * r],
                raft_port=ports[2 * r + 1],
                health_port=ports[7 + r],
                data_dir=str(tmp_path / "data" / f"n{r}"),
                bind_host="127.0.0.1",
            )
            for r in range(3)
        ]
    ]
    cluster_map, configs = render.build(layout, str(tmp_path / "cluster.json"), 64, secrets_dir=str(tmp_path))
    secret = tmp_path / render.secret_file_name(0)
    secret.write_text("a-test-secret-that-is-long-enough-0123456789\n")
    secret.chmod(0o600)
    for path, text in render.config_files(cluster_map, configs).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    for sub in ("logs", "run"):
        (tmp_path / sub).mkdir()
    cluster = LocalCluster(tmp_path)
    router = None
    try:
        cluster.start_all()
        shards = cluster.wait_for_leaders(60)
        leader = shards[0]["leader"]
        # Followers name the leader: they matched its advertised DNS Raft address to the map.
        wait_until(lambda: [r["leader"] for r in cluster.status()[0]["replicas"]] == [leader] * 3, 20)
        for r in range(3):  # what the probes ask, on each node's own health port
            assert wait_until(lambda r=r: health.check(f"localhost:{ports[7 + r]}") == "SERVING", 10)
        with Client.from_cluster(tmp_path) as kv:
            revision = kv.put(b"deploy:k", b"v")
            assert kv.get(b"deploy:k") == b"v" and revision > 0
        router = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "router", "--cluster", str(tmp_path)]
            + ["--listen", f"127.0.0.1:{ports[6]}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        with Client(router=f"localhost:{ports[6]}") as thin:
            assert wait_until(lambda: _get_or_none(thin, b"deploy:k") == b"v", 20)
    finally:
        if router is not None:
            stop_process(router)
        cluster.down()


def _get_or_none(kv: Client, key: bytes) -> bytes | None:
    try:
        return kv.get(key)
    except Exception:  # the router may still be starting: retried by wait_until
        return None
