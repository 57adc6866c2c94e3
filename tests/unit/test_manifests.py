"""Scenarios: the Kubernetes manifests in daemonset/ are valid Kubernetes objects, and they agree
with the code they deploy: the agent's settings, ports and readiness path, the Kubernetes
source's resources (RBAC), the uninstall command, the image, and the kustomizations."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prereq import require_tool

from agent import config
from agent.commands import datapath as uninstall_cli
from agent.datapath.options import DEFAULT_PIN_ROOT
from agent.model.mesh import DATAPLANE_MODE_LABEL
from agent.policy.authz import Action, parse_authorization_policy
from agent.sources.kubernetes import RESOURCES
from agent.telemetry.server import DEFAULT_PORT as METRICS_SERVER_PORT

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "daemonset"
IMAGE_DIR = DEPLOY / "image"  # the container build, not objects to apply
ENTRYPOINT = IMAGE_DIR / "entrypoint.sh"
# The oldest Kubernetes release the manifests target (appArmorProfile appeared in 1.30) and the
# newest whose schemas kubernetes-validate bundles.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Custom resources: no bundled schema; their shape is checked by the tests below.
CUSTOM_GROUPS = ("monitoring.coreos.com/", "security.istio.io/")
# The Kubernetes source only lists (paginated collection GETs) and watches (?watch=1); see
# agent/sources/kubernetes.py and docs/kubernetes.md, "What it reads".
SOURCE_VERBS = {"list", "watch"}
CAPABILITIES = {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}

Obj = dict[str, Any]


# -- loading ------------------------------------------------------------------------------------
def patch_files() -> set[Path]:
    """Partial objects that kustomize merges into others (not objects of their own)."""
    return {k.parent / patch["path"] for k in DEPLOY.rglob("kustomization.yaml")
            for patch in yaml.safe_load(k.read_text(encoding="utf-8")).get("patches", [])}


def manifest_files() -> list[Path]:
    patches = patch_files()
    return sorted(p for p in DEPLOY.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and IMAGE_DIR not in p.parents
                  and p not in patches)


def load_all(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def objects() -> Iterator[tuple[Path, Obj]]:
    for path in manifest_files():
        for doc in load_all(path):
            yield path, doc


def the(kind: str, name: str, path: Path | None = None) -> Obj:
    found = [d for p, d in objects() if d["kind"] == kind and d["metadata"]["name"] == name
             and (path is None or p == path)]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    doc: Obj = found[0]
    return doc


def agent_ds() -> Obj:
    return the("DaemonSet", "nodemesh")


def container(ds: Obj, name: str) -> Obj:
    found: list[Obj] = [c for c in ds["spec"]["template"]["spec"]["containers"]
                        if c["name"] == name]
    (c,) = found
    return c


def env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs:` file: KEY=VALUE lines, # comments and blank lines ignored."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value
    return out


@functools.cache
def _kustomized(directory: Path, kubectl: str) -> str:
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
    return out.stdout


def kustomize(directory: Path) -> list[Obj]:
    """The objects `kubectl apply -k directory` would send (kubectl's built-in kustomize)."""
    text = _kustomized(directory, require_tool("kubectl"))
    return [d for d in yaml.safe_load_all(text) if d is not None]


def flag_values(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        assert a.startswith("--") and "=" in a, f"args are --flag=value pairs, not {a!r}"
        k, _, v = a.partition("=")
        out[k] = v
    return out


def port_number(c: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (n,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == port]
    return int(n)


# -- every object is valid ----------------------------------------------------------------------
def test_every_manifest_parses_and_names_what_it_is() -> None:
    assert manifest_files(), "no manifests found under daemonset/"
    for path, doc in objects():
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{path}: document without {key}"
        assert doc["metadata"].get("name"), f"{path}: {doc['kind']} without a name"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_builtin_objects_validate_against_the_kubernetes_schema(version: str) -> None:
    checked = 0
    for path, doc in objects():
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']} {doc['metadata']['name']} "
                        f"(Kubernetes {version}): {exc.message}")
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_rendered_kustomizations_validate_including_generated_configmaps(version: str) -> None:
    for directory in kustomizations():
        for doc in kustomize(directory):
            if not doc["apiVersion"].startswith(CUSTOM_GROUPS):
                kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_what_the_api_server_would() -> None:
    ds = agent_ds()
    ds["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBE_VERSIONS[0], strict=True)


def pod_specs() -> Iterator[tuple[str, Obj, Obj]]:
    for _path, doc in objects():
        if doc["kind"] in ("DaemonSet", "Deployment"):
            yield doc["metadata"]["name"], doc, doc["spec"]["template"]["spec"]


def test_rules_the_api_server_enforces_beyond_the_schema() -> None:
    for name, doc, spec in pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            added = set(sc.get("capabilities", {}).get("add", []))
            for m in c.get("volumeMounts", []):
                if m.get("mountPropagation") == "Bidirectional":
                    assert sc.get("privileged") is True, (
                        f"{name}/{c['name']}: Bidirectional propagation needs privileged")
            if sc.get("allowPrivilegeEscalation") is False:
                assert "SYS_ADMIN" not in added and not sc.get("privileged"), (
                    f"{name}/{c['name']}: allowPrivilegeEscalation false with SYS_ADMIN")
        # Surge pods run next to the old ones: host ports would keep them Pending forever.
        surge = doc["spec"].get("updateStrategy", {}).get("rollingUpdate", {}).get("maxSurge", 0)
        if doc["kind"] == "DaemonSet" and surge:
            assert not spec.get("hostNetwork"), f"{name}: maxSurge with hostNetwork"
            for c in spec["containers"]:
                assert all("hostPort" not in p for p in c.get("ports", [])), name


# -- the agent's DaemonSet agrees with the agent ------------------------------------------------
def agent_environment() -> dict[str, str]:
    """What the agent container sees: the ConfigMap (mesh.env) under its env entries."""
    c = container(agent_ds(), "agent")
    (ref,) = c["envFrom"]
    assert ref["configMapRef"]["name"] == "nodemesh-config"
    env = env_file(DEPLOY / "agent" / "mesh.env")
    for e in c["env"]:
        env[e["name"]] = e["value"] if "value" in e else f"<{e['valueFrom']['fieldRef']}>"
    return env


def test_every_variable_and_flag_the_daemonset_passes_is_an_agent_setting() -> None:
    c = container(agent_ds(), "agent")
    assert c["command"][-2:] == ["nodemesh", "run"]
    unknown_flags = set(flag_values(c["args"])) - config.flags_of()
    assert not unknown_flags, f"flags nodemesh run does not take: {unknown_flags}"
    unknown_env = set(agent_environment()) - config.envs_of()
    assert not unknown_env, f"variables the agent does not read: {unknown_env}"


def test_the_agent_builds_its_config_from_the_daemonset() -> None:
    """The same parser flags as `nodemesh run` and the same builder, on the manifest's values."""
    c = container(agent_ds(), "agent")
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    env = {k: ("node-a" if k == "NODE_NAME" else v) for k, v in agent_environment().items()}
    cfg = config.from_environment(parser.parse_args(c["args"]), env)
    assert cfg.source == "kubernetes" and cfg.node_name == "node-a"
    assert cfg.origins["node_name"] == "env NODE_NAME"
    fields = c["env"][0]
    assert fields == {"name": "NODE_NAME",
                      "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    # Paths the agent writes or attaches to are on the volumes mounted for them.
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for value in (cfg.cgroup_root, cfg.pin_dir, cfg.ca_root_cert, cfg.flow_log, cfg.audit_log):
        assert value is not None
        assert any(Path(m) in (value, *value.parents) for m in mounts), f"{value} not mounted"
    assert DEFAULT_PIN_ROOT in cfg.pin_dir.parents  # what `nodemesh uninstall --all` covers
    assert cfg.drain_seconds < agent_ds()["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]


def test_nodemesh_run_accepts_the_daemonset_command_line() -> None:
    from agent.cli import build_parser  # noqa: PLC0415 -- imports every subcommand module

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "run" in sub.choices, "`nodemesh run` is not registered in agent/cli.py COMMANDS"
    c = container(agent_ds(), "agent")
    args = parser.parse_args([c["command"][-1], *c["args"]])
    assert args.pin_dir == "/sys/fs/bpf/nodemesh/default"


def test_ports_and_probes_match_the_agents_defaults() -> None:
    c = container(agent_ds(), "agent")
    metrics = config.parse_addr(config.DEFAULT_METRICS_ADDR)[1]
    ready = config.parse_addr(config.DEFAULT_READINESS_ADDR)[1]
    assert (metrics, ready) == (15020, 15021) and metrics == METRICS_SERVER_PORT
    env = agent_environment()
    assert "METRICS_ADDR" not in env and "READINESS_ADDR" not in env  # the defaults apply
    assert {p["containerPort"] for p in c["ports"]} == {metrics, ready}
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"] == "/healthz/ready" and port_number(c, probe["port"]) == ready
    for kind in ("startupProbe", "livenessProbe"):
        assert port_number(c, c[kind]["tcpSocket"]["port"]) == ready
    svc = the("Service", "nodemesh-metrics")
    (sp,) = svc["spec"]["ports"]
    assert port_number(c, sp["targetPort"]) == metrics
    assert svc["spec"]["selector"].items() <= agent_labels().items()


def test_the_readiness_path_is_the_one_the_agent_serves() -> None:
    admin = pytest.importorskip("agent.runtime.admin")
    app = admin.readiness_app(lambda: (True, "ready"))
    paths = {r.canonical for r in app.router.resources()}
    probe = container(agent_ds(), "agent")["readinessProbe"]["httpGet"]["path"]
    assert probe in paths


def agent_labels() -> Mapping[str, str]:
    labels: Mapping[str, str] = agent_ds()["spec"]["template"]["metadata"]["labels"]
    return labels


def test_the_daemonset_runs_as_designed() -> None:
    ds = agent_ds()
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= agent_labels().items()
    assert spec["hostPID"] is True and not spec.get("hostNetwork")
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]  # every taint
    rolling = ds["spec"]["updateStrategy"]
    assert rolling == {"type": "RollingUpdate",
                       "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    c = container(ds, "agent")
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": sorted(CAPABILITIES)}
    assert "lifecycle" not in c  # no preStop: termination must not uninstall
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    host_paths = {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
                  for m in c["volumeMounts"] if "hostPath" in volumes[m["name"]]}
    assert host_paths["/sys/fs/bpf"] == "/sys/fs/bpf"
    assert host_paths["/host/lib/modules"] == "/lib/modules"
    assert host_paths["/host/usr/src"] == "/usr/src"
    for m in c["volumeMounts"]:
        if m["mountPath"].startswith("/host/lib") or m["mountPath"].startswith("/host/usr"):
            assert m["readOnly"] is True
    (init,) = spec["initContainers"]
    (bpffs,) = init["volumeMounts"]
    assert bpffs["mountPropagation"] == "Bidirectional" and bpffs["mountPath"] == "/sys/fs/bpf"


def test_the_cluster_role_grants_exactly_what_the_kubernetes_source_reads() -> None:
    role = the("ClusterRole", "nodemesh")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    needed = {(res.group_version.rpartition("/")[0], res.name, verb)
              for res in RESOURCES.values() for verb in SOURCE_VERBS}
    assert granted == needed
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])
    binding = the("ClusterRoleBinding", "nodemesh")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "nodemesh"}
    sa = the("ServiceAccount", "nodemesh")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    assert agent_ds()["spec"]["template"]["spec"]["serviceAccountName"] == "nodemesh"


def test_namespaced_objects_live_in_the_agents_namespace() -> None:
    the("Namespace", "nodemesh-system")
    for path, doc in objects():
        if DEPLOY / "samples" in path.parents:
            continue
        ns = doc["metadata"].get("namespace")
        assert ns in (None, "nodemesh-system"), f"{path}: {doc['kind']} in {ns}"


# -- monitoring ---------------------------------------------------------------------------------
def test_the_pod_monitor_scrapes_the_agents_metrics_port() -> None:
    pm = the("PodMonitor", "nodemesh")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"].items() <= agent_labels().items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    c = container(agent_ds(), "agent")
    assert port_number(c, ep["port"]) == config.parse_addr(config.DEFAULT_METRICS_ADDR)[1]
    assert ep["path"] == "/metrics"


def test_the_prometheus_rule_has_the_operators_shape() -> None:
    rule = the("PrometheusRule", "nodemesh")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert alerts and all(isinstance(g["name"], str) for g in rule["spec"]["groups"])
    for r in alerts:
        assert re.fullmatch(r"[A-Z][A-Za-z]+", r["alert"]) and r["expr"].strip()
        assert r["labels"]["severity"] in ("warning", "critical")


def test_the_dashboard_configmap_carries_the_dashboard_unchanged() -> None:
    rendered = kustomize(DEPLOY)
    (cm,) = [d for d in rendered if d["kind"] == "ConfigMap"
             and d["metadata"]["name"] == "nodemesh-dashboard"]
    assert cm["metadata"]["namespace"] == "nodemesh-system"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (DEPLOY / "grafana" / "nodemesh-dashboard.json").read_text(encoding="utf-8")
    assert cm["data"]["nodemesh-dashboard.json"] == text
    json.loads(text)


# -- kustomizations -----------------------------------------------------------------------------
def kustomizations() -> dict[Path, Obj]:
    return {p.parent: yaml.safe_load(p.read_text(encoding="utf-8"))
            for p in DEPLOY.rglob("kustomization.yaml")}


def referenced(directory: Path, k: Obj) -> set[Path]:
    refs = {directory / r for r in k.get("resources", [])}
    refs |= {directory / p["path"] for p in k.get("patches", [])}
    for gen in k.get("configMapGenerator", []):
        refs |= {directory / f.rpartition("=")[2] for f in gen.get("files", [])}
        refs |= {directory / f for f in gen.get("envs", [])}
    return refs


def test_each_kustomization_lists_every_file_beside_it() -> None:
    ks = kustomizations()
    for directory, k in ks.items():
        refs = referenced(directory, k)
        for ref in refs:
            assert ref.exists(), f"{directory.name}/kustomization.yaml names missing {ref.name}"
        present = {p for p in directory.iterdir() if p.is_file()
                   and p.suffix in (".yaml", ".json", ".env") and p.name != "kustomization.yaml"}
        assert present <= refs, f"{directory}: not in its kustomization: {present - refs}"
    for path in DEPLOY.rglob("*"):
        if path.suffix in (".yaml", ".json", ".env") and IMAGE_DIR not in path.parents:
            assert path.parent in ks, f"{path} is in no kustomization"
    # The top level ties the agent and its monitoring together.
    assert referenced(DEPLOY, ks[DEPLOY]) == {DEPLOY / "agent", DEPLOY / "prometheus",
                                             DEPLOY / "grafana"}


def test_the_top_level_kustomization_renders_the_whole_install() -> None:
    rendered = kustomize(DEPLOY)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in rendered)
    (cm,) = [d for d in rendered if d["metadata"]["name"].startswith("nodemesh-config-")]
    assert kinds == sorted([
        "Namespace/nodemesh-system", "ServiceAccount/nodemesh", "ClusterRole/nodemesh",
        "ClusterRoleBinding/nodemesh", f"ConfigMap/{cm['metadata']['name']}",
        "ConfigMap/nodemesh-dashboard", "DaemonSet/nodemesh", "Service/nodemesh-metrics",
        "PodMonitor/nodemesh", "PrometheusRule/nodemesh",
        "ServiceAccount/nodemesh-ca", "ClusterRole/nodemesh-ca", "ClusterRoleBinding/nodemesh-ca",
        "ClusterRoleBinding/nodemesh-ca-auth-delegator", "Deployment/nodemesh-ca",
        "Service/nodemesh-ca", "CustomResourceDefinition/connectionratelimits.nodemesh.io"])
    # The generated ConfigMap is the one the DaemonSet reads (kustomize renames the reference).
    (ds,) = [d for d in rendered if d["kind"] == "DaemonSet"]
    assert container(ds, "agent")["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    assert cm["data"] == env_file(DEPLOY / "agent" / "mesh.env")


# -- the central CA ------------------------------------------------------------------------------
CA_KEY_SECRET = "nodemesh-ca-root"


def ca_deployment() -> Obj:
    return the("Deployment", "nodemesh-ca")


def secrets_of(spec: Obj) -> set[str]:
    """Every Secret a pod spec can read: secret volumes and projected secret sources."""
    out = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    out |= {src["secret"]["name"] for v in spec.get("volumes", []) if "projected" in v
            for src in v["projected"]["sources"] if "secret" in src}
    for c in spec.get("initContainers", []) + spec["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                out.add(ref["name"])
        out |= {f["secretRef"]["name"] for f in c.get("envFrom", []) if "secretRef" in f}
    return out


def test_no_agent_can_read_a_signing_key() -> None:
    """The CA key Secret is mounted by the CA Deployment and by nothing else; the agents mount
    no Secret at all and no host directory where an embedded CA kept its root and key."""
    for name, doc, spec in pod_specs():
        readable = secrets_of(spec)
        if doc["kind"] == "Deployment" and name == "nodemesh-ca":
            assert readable == {CA_KEY_SECRET}
        else:
            assert CA_KEY_SECRET not in readable, f"{name} can read the CA key"
    ds_spec = agent_ds()["spec"]["template"]["spec"]
    assert secrets_of(ds_spec) == set()
    host = {v["hostPath"]["path"] for v in ds_spec["volumes"] if "hostPath" in v}
    assert not any(p == "/var/lib/nodemesh" or p.startswith("/var/lib/nodemesh/") for p in host)
    # Nothing else in the install may grant reading Secrets either.
    for _path, doc in objects():
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                assert "secrets" not in rule["resources"], doc["metadata"]["name"]


def test_the_agent_trusts_the_root_certificate_and_authenticates_with_a_projected_token() -> None:
    ds = agent_ds()
    c = container(ds, "agent")
    flags = flag_values(c["args"])
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    root_cert, token = Path(flags["--ca-root-cert"]), Path(flags["--ca-token"])
    (root_vol,) = [n for n, v in volumes.items() if "configMap" in v
                   and v["configMap"]["name"] == "nodemesh-ca-root-cert"]
    assert Path(mounts[root_vol]["mountPath"]) == root_cert.parent
    assert mounts[root_vol]["readOnly"] is True
    (tok_vol,) = [n for n, v in volumes.items() if "projected" in v]
    (src,) = volumes[tok_vol]["projected"]["sources"]
    sa_token = src["serviceAccountToken"]
    assert Path(mounts[tok_vol]["mountPath"]) / sa_token["path"] == token
    assert sa_token["audience"] == "istio-ca"  # what istiod and the nodemesh CA expect
    assert 600 <= sa_token["expirationSeconds"] <= 86400
    # CA_ADDRESS names the CA Service, on its port, with a name in the CA's certificate.
    env = agent_environment()
    host, _, port = env["CA_ADDRESS"].rpartition(":")
    svc = the("Service", "nodemesh-ca")
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    (svc_port,) = svc["spec"]["ports"]
    assert int(port) == svc_port["port"] == 15012
    ca = container(ca_deployment(), "ca")
    assert host in [a.partition("=")[2] for a in ca["args"] if a.startswith("--server-name=")]
    assert svc["spec"]["selector"].items() <= ca_deployment()["spec"]["template"]["metadata"][
        "labels"].items()


def test_the_ca_deployment_runs_nodemesh_ca_serve_as_designed() -> None:
    from agent.cli import build_parser  # noqa: PLC0415 -- imports every subcommand module

    dep = ca_deployment()
    spec = dep["spec"]["template"]["spec"]
    ca = container(dep, "ca")
    assert ca["command"] == ["nodemesh", "ca", "serve"]
    args = build_parser().parse_args(ca["command"][1:] + ca["args"])
    assert args.kube and args.kubeconfig is None and args.workloads is None
    assert args.token_audience == ["istio-ca"] and args.token_check == "tokenreview"
    agent_spec = agent_ds()["spec"]["template"]["spec"]
    agent_sa = the("ServiceAccount", agent_spec["serviceAccountName"])
    assert args.agent_service_account == [
        f"{agent_sa['metadata']['namespace']}/{agent_sa['metadata']['name']}"]
    assert args.trust_domain == agent_environment()["TRUST_DOMAIN"]
    assert args.cluster_id == agent_environment()["CLUSTER_ID"]
    assert args.listen.endswith(":15012")
    # The key is read from the Secret's read-only mount.
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in ca["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert Path(mount["mountPath"]) == args.root_key.parent == args.root_cert.parent
    assert mount["readOnly"] is True
    sc = ca["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and spec["securityContext"]["runAsNonRoot"]
    assert spec["serviceAccountName"] == "nodemesh-ca"


def test_only_the_ca_reviews_tokens_and_it_reads_only_pods() -> None:
    delegators = [d for _p, d in objects() if d["kind"] == "ClusterRoleBinding"
                  and d["roleRef"]["name"] == "system:auth-delegator"]
    assert [b["subjects"] for b in delegators] == [[
        {"kind": "ServiceAccount", "name": "nodemesh-ca", "namespace": "nodemesh-system"}]]
    role = the("ClusterRole", "nodemesh-ca")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["list", "watch"]}]
    binding = the("ClusterRoleBinding", "nodemesh-ca")
    assert binding["roleRef"]["name"] == "nodemesh-ca"
    assert binding["subjects"] == delegators[0]["subjects"]


# -- uninstall ----------------------------------------------------------------------------------
def test_the_cleanup_daemonset_runs_nodemesh_uninstall_over_the_agents_pins() -> None:
    ds = the("DaemonSet", "nodemesh-cleanup")
    spec = ds["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["command"][0] == "nodemesh"
    parser = argparse.ArgumentParser()
    uninstall_cli.register(parser.add_subparsers())
    args = parser.parse_args(init["command"][1:])
    assert args.all and args.func is uninstall_cli.run
    agent_pin = Path(flag_values(container(agent_ds(), "agent")["args"])["--pin-dir"])
    assert args.pin_root in agent_pin.parents
    (m,) = init["volumeMounts"]
    assert Path(m["mountPath"]) in args.pin_root.parents or Path(m["mountPath"]) == args.pin_root
    assert {"operator": "Exists"} in spec["tolerations"]


# -- image --------------------------------------------------------------------------------------
def test_every_pod_runs_the_image_the_project_builds() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))[
        "project"]["version"]
    for _name, _doc, spec in pod_specs():
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].startswith("busybox"):
                continue  # sample workloads
            assert c["image"] == f"localhost/nodemesh:{version}"
    dockerfile = (IMAGE_DIR / "Dockerfile").read_text(encoding="utf-8")
    assert container(agent_ds(), "agent")["command"][0] in dockerfile  # the entrypoint's path
    assert re.search(r"^FROM (docker.io/library/)?debian:bookworm", dockerfile, re.M)
    for pkg in ("python3-bpfcc", "bpftool", "iproute2", "linux-headers-"):
        assert pkg in dockerfile
    assert "dist-packages/bcc" in dockerfile  # only bcc linked into the venv, as setup.sh does


def test_the_image_compiles_the_data_path_in_a_build_stage_only() -> None:
    dockerfile = (IMAGE_DIR / "Dockerfile").read_text(encoding="utf-8")
    *builds, runtime = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    (build,) = builds
    assert build.startswith(runtime.split("\n", 1)[0].split()[0])  # one base image: one ABI
    assert re.search(r"^COPY .*\bsetup\.py\b", build, re.M)  # the build hook with COMPILED
    assert "python3-dev" in build and "gcc" in build and "pip wheel" in build
    assert re.search(r"^COPY --from=build /wheels", runtime, re.M)
    for tool in ("gcc", "python3-dev", "build-essential", "clang"):
        assert tool not in runtime, f"{tool} in the runtime image"
    assert "compiled_modules()" in runtime  # the image refuses to ship an uncompiled data path


def run_entrypoint(tmp_path: Path, kernel: str, **env: str) -> tuple[Path, str]:
    modules = tmp_path / "modules"
    base = {"NM_KERNEL": kernel, "NM_MODULES": str(modules), "NM_HOST": str(tmp_path / "host"),
            "NM_KHEADERS": str(tmp_path / "no-kheaders"), "NM_BUNDLED": str(tmp_path / "image")}
    out = subprocess.run(["sh", str(ENTRYPOINT), "echo", "exec'd"], capture_output=True,
                         text=True, check=True, env={**os.environ, **base, **env}, timeout=30)
    assert out.stdout == "exec'd\n"
    return modules / kernel, out.stderr


def test_entrypoint_links_the_hosts_headers_into_the_container(tmp_path: Path) -> None:
    kernel = "6.8.0-45-generic"
    src = tmp_path / "host" / "usr" / "src"
    (src / f"linux-headers-{kernel}" / "include").mkdir(parents=True)
    (src / "linux-headers-6.8.0-45" / "include").mkdir(parents=True)
    mods = tmp_path / "host" / "lib" / "modules" / kernel
    mods.mkdir(parents=True)
    # The host's links are absolute paths of the host, which this container sees under /host.
    (mods / "build").symlink_to(f"/usr/src/linux-headers-{kernel}")
    (mods / "source").symlink_to("/usr/src/linux-headers-6.8.0-45")
    linked, log = run_entrypoint(tmp_path, kernel)
    assert (linked / "build").resolve() == src / f"linux-headers-{kernel}"
    assert (linked / "source").resolve() == src / "linux-headers-6.8.0-45"
    assert "host's headers" in log


def test_entrypoint_falls_back_to_the_images_headers(tmp_path: Path) -> None:
    for d in ("linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-12-amd64",
              "linux-headers-6.1.0-12-common"):
        (tmp_path / "image" / d).mkdir(parents=True)
    linked, log = run_entrypoint(tmp_path, "6.18.0")
    assert (linked / "build").resolve() == tmp_path / "image" / "linux-headers-6.1.0-12-amd64"
    assert (linked / "source").resolve() == tmp_path / "image" / "linux-headers-6.1.0-12-common"
    assert "install linux-headers-6.18.0 on the node" in log


def test_entrypoint_leaves_builtin_kernel_headers_to_bcc(tmp_path: Path) -> None:
    (tmp_path / "kheaders.tar.xz").write_bytes(b"")
    (tmp_path / "image" / "linux-headers-6.1.0-12-amd64").mkdir(parents=True)
    linked, log = run_entrypoint(tmp_path, "6.18.0", NM_KHEADERS=str(tmp_path / "kheaders.tar.xz"))
    assert not linked.exists() and "kernel's own" in log


def test_entrypoint_without_any_headers_says_what_to_install(tmp_path: Path) -> None:
    linked, log = run_entrypoint(tmp_path, "6.18.0")
    assert not (linked / "build").exists()
    assert "Install linux-headers-6.18.0 on the node" in log


# -- samples ------------------------------------------------------------------------------------
def test_the_sample_policy_is_one_the_agent_enforces() -> None:
    samples = DEPLOY / "samples"
    policy = the("AuthorizationPolicy", "server-allow-client")
    parsed = parse_authorization_policy(policy)
    assert parsed.action is Action.ALLOW
    ns = the("Namespace", "demo", samples / "demo.yaml")
    assert ns["metadata"]["labels"][DATAPLANE_MODE_LABEL] == "ambient"
    server = the("Deployment", "server")
    assert policy["spec"]["selector"]["matchLabels"].items() <= server["spec"]["template"][
        "metadata"]["labels"].items()
    (principal,) = policy["spec"]["rules"][0]["from"][0]["source"]["principals"]
    client = the("Deployment", "client")
    sa = client["spec"]["template"]["spec"]["serviceAccountName"]
    assert principal == f"cluster.local/ns/demo/sa/{sa}"
    crds = {d["spec"]["names"]["plural"] for d in load_all(DEPLOY / "istio-crds" /
                                                            "security-crds.yaml")}
    istio = {r.name for r in RESOURCES.values() if r.group_version.startswith("security.")}
    assert crds == istio  # the stand-ins cover what the agent waits for


# -- Pod Security -------------------------------------------------------------------------------
# What the Pod Security `baseline` level allows (kubernetes.io/docs/concepts/security/
# pod-security-standards): capabilities beyond these, host namespaces, hostPath volumes,
# privileged containers and unconfined seccomp/AppArmor need `privileged`.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT"}


def beyond_baseline(pod: Obj) -> list[str]:
    found = [f"spec.{k}" for k in ("hostPID", "hostIPC", "hostNetwork") if pod.get(k)]
    found += [f"hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        found += [f"{c['name']}: capability {cap}"
                  for cap in set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES]
        for profile in ("seccompProfile", "appArmorProfile"):
            if sc.get(profile, {}).get("type") == "Unconfined":
                found.append(f"{c['name']}: {profile} Unconfined")
    return found


def test_the_namespace_admits_the_agent_under_pod_security_and_only_what_it_needs() -> None:
    labels = the("Namespace", "nodemesh-system")["metadata"]["labels"]
    ds = agent_ds()
    pod = ds["spec"]["template"]["spec"]
    # The agent needs more than baseline, so a cluster enforcing baseline would reject it
    # unless its namespace says privileged.
    assert beyond_baseline(pod)
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "privileged"
    # Only the init container that mounts bpffs on the host is privileged, and the agent
    # container adds exactly the capabilities it documents, one by one.
    assert [c["name"] for c in pod["initContainers"] + pod["containers"]
            if c.get("securityContext", {}).get("privileged")] == ["mount-bpffs"]
    agent = container(ds, "agent")
    assert set(agent["securityContext"]["capabilities"]["add"]) == CAPABILITIES
    text = (DEPLOY / "agent" / "daemonset.yaml").read_text()
    for cap in CAPABILITIES:
        assert f"                - {cap}\n" in text
    ns_text = (DEPLOY / "agent" / "namespace.yaml").read_text()
    for why in ("hostPID", "hostPath", "Unconfined", "privileged: only the mount-bpffs"):
        assert why in ns_text, f"namespace.yaml does not say why it needs {why}"
