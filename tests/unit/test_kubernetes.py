"""deploy/kubernetes and deploy/image: rendered, validated, and run.

- The kustomizations render with a small renderer below (the features they use, nothing else: it
  refuses any other field) and, where kubectl is installed, with `kubectl kustomize`; both must
  agree. Under CI=true kubectl must be there.
- Every rendered object of a core kind validates against the Kubernetes OpenAPI schemas that the
  `kubernetes-validate` package bundles (strict: unknown fields fail), for the oldest Kubernetes the
  manifests support and the newest the package knows, without touching the network. The API
  server's own cross-field rules the schemas cannot express are checked here too.
- The container's arguments go through rsttrace's real argument parser, and the port they listen
  on is the one the container, the probes, the Service and the scrape annotations name.
- The PrometheusRule is deploy/prometheus/rules.yml, generated (``python3 tests/unit/test_kubernetes.py
  --write-prometheusrule`` rewrites it).
- deploy/image/Containerfile is checked statically, its apt-get step is resolved by apt (simulated),
  and its other RUN steps are run for real into a temporary prefix.
- As root with BPF, the DaemonSet's command runs in a simulated pod: its own pid, network and
  mount namespaces, a read-only root, the manifest's mounts (host paths read-only, emptyDirs as
  tmpfs) and exactly its capabilities, using the venv the Containerfile's steps built. A "pod"
  whose process runs as another user gets its resets labelled, and without CAP_SYS_PTRACE does not.
  Two strict xfails mark what rsttrace still reads from its own /proc rather than --proc-root (the
  host's TCP counters, other namespaces' overflow counters): fixing either makes its test fail
  until the marker goes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Set, Tuple

import pytest
import yaml

from rsttrace import __version__
from rsttrace.cli import build_parser
from rsttrace.sinks.exporter import DEFAULT_PORT
from rsttrace.sinks.httpserve import parse_listen

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
KUBE = os.path.join(ROOT, "deploy", "kubernetes")
BASE = os.path.join(KUBE, "base")
COMPONENTS = os.path.join(KUBE, "components")
RULES = os.path.join(ROOT, "deploy", "prometheus", "rules.yml")
PROMETHEUSRULE = os.path.join(COMPONENTS, "monitoring", "prometheusrule.yaml")
CONTAINERFILE = os.path.join(ROOT, "deploy", "image", "Containerfile")
WRAPPER = os.path.join(ROOT, "deploy", "image", "rsttrace")
IN_CI = os.environ.get("CI", "").lower() == "true"

# The oldest Kubernetes the manifests need (appArmorProfile and recursiveReadOnly are 1.30 fields)
# and the newest whose schemas kubernetes-validate bundles.
K8S_OLDEST = "1.30"
K8S_NEWEST = "1.37"

Obj = Dict[str, Any]


def missing_tool(what: str) -> NoReturn:
    if IN_CI:
        pytest.fail("%s (CI must run this test, never skip it)" % what)
    pytest.skip(what)


# --- a renderer for the kustomize features these directories use ------------------------------
class KustomizeError(Exception):
    pass


KNOWN_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "components", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "CustomResourceDefinition"}


def _load_kustomization(path: str) -> Obj:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f) as fh:
                k: Obj = yaml.safe_load(fh)
            unknown = set(k) - KNOWN_FIELDS
            if unknown:
                raise KustomizeError("%s: this renderer does not implement %s" % (f, sorted(unknown)))
            return k
    raise KustomizeError("no kustomization in %s" % path)


def _json_pointer(doc: Any, path: str) -> Tuple[Any, str]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    for p in parts[:-1]:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc, parts[-1]


def _json6902(obj: Obj, ops: List[Obj]) -> None:
    for op in ops:
        parent, key = _json_pointer(obj, op["path"])
        if op["op"] == "add":
            if isinstance(parent, list):
                if key == "-":
                    parent.append(copy.deepcopy(op["value"]))
                else:
                    parent.insert(int(key), copy.deepcopy(op["value"]))
            else:
                parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            if isinstance(parent, list):
                parent[int(key)] = copy.deepcopy(op["value"])
            else:
                if key not in parent:
                    raise KustomizeError("replace of missing %s" % op["path"])
                parent[key] = copy.deepcopy(op["value"])
        elif op["op"] == "test":
            got = parent[int(key)] if isinstance(parent, list) else parent.get(key)
            if got != op["value"]:
                raise KustomizeError("patch test failed at %s: %r != %r" % (op["path"], got, op["value"]))
        else:
            raise KustomizeError("patch op %r not implemented" % op["op"])


def _matches(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": obj["kind"], "name": obj["metadata"]["name"]}
    unknown = set(target) - set(want)
    if unknown:
        raise KustomizeError("patch target fields %s not implemented" % sorted(unknown))
    return all(want[k] == v for k, v in target.items())


def _transform(objs: List[Obj], k: Obj) -> None:
    for patch in k.get("patches", []):
        if set(patch) != {"target", "patch"}:
            raise KustomizeError("only inline JSON 6902 patches with a target are implemented")
        ops = yaml.safe_load(patch["patch"])
        hits = [o for o in objs if _matches(o, patch["target"])]
        if not hits:
            raise KustomizeError("patch target %s matches nothing" % patch["target"])
        for o in hits:
            _json6902(o, ops)
    for entry in k.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates") or set(entry) - {"pairs", "includeSelectors"}:
            raise KustomizeError("labels: only pairs with includeSelectors false are implemented")
        for o in objs:
            o["metadata"].setdefault("labels", {}).update(entry["pairs"])
    if "namespace" in k:
        for o in objs:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        if set(image) - {"name", "newName", "newTag"}:
            raise KustomizeError("images: only name, newName, newTag are implemented")
        for o in objs:
            spec = o.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = "%s:%s" % (image.get("newName", name), image.get("newTag", tag or "latest"))


def render(path: str, kind: str = "Kustomization") -> List[Obj]:
    """What `kustomize build path` gives, for the features above; anything else raises."""
    k = _load_kustomization(path)
    if k.get("kind", "Kustomization") != kind:
        raise KustomizeError("%s is a %s, expected a %s" % (path, k.get("kind"), kind))
    objs: List[Obj] = []
    for res in k.get("resources", []):
        full = os.path.normpath(os.path.join(path, res))
        if os.path.isdir(full):
            objs.extend(render(full))
        else:
            with open(full) as fh:
                objs.extend(d for d in yaml.safe_load_all(fh) if d)
    for comp in k.get("components", []):
        ck = _load_kustomization(os.path.join(path, comp))
        if ck.get("kind") != "Component":
            raise KustomizeError("%s is not a Component" % comp)
        cpath = os.path.normpath(os.path.join(path, comp))
        for res in ck.get("resources", []):
            with open(os.path.join(cpath, res)) as fh:
                objs.extend(d for d in yaml.safe_load_all(fh) if d)
        _transform(objs, ck)
    _transform(objs, k)
    return objs


def kubectl_kustomize(path: str) -> Optional[List[Obj]]:
    """`kubectl kustomize path`, or None when no kubectl with kustomize v4+ (components) is here."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        v = json.loads(subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True,
                                      text=True, timeout=60).stdout)
    except (ValueError, subprocess.SubprocessError):
        return None
    m = re.match(r"v(\d+)", v.get("kustomizeVersion", ""))
    if not m or int(m.group(1)) < 4:
        return None
    out = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def key(o: Obj) -> Tuple[str, str]:
    return o["kind"], o["metadata"]["name"]


def by_kind(objs: List[Obj]) -> Dict[str, Obj]:
    out: Dict[str, Obj] = {}
    for o in objs:
        assert o["kind"] not in out, "two %s objects" % o["kind"]
        out[o["kind"]] = o
    return out


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An overlay as an operator would write it: the base with every component."""
    d = str(tmp_path_factory.mktemp("overlay"))
    with open(os.path.join(d, "kustomization.yaml"), "w") as f:
        yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(BASE, d)],
            "components": [os.path.relpath(os.path.join(COMPONENTS, c), d)
                           for c in ("monitoring", "node-headers", "legacy-kernel")],
        }, f)
    return d


VARIANTS = {"base": KUBE, "monitoring": os.path.join(KUBE, "monitoring")}


@pytest.fixture(params=["base", "monitoring", "everything"])
def variant(request: pytest.FixtureRequest, everything: str) -> str:
    return everything if request.param == "everything" else VARIANTS[request.param]


@pytest.fixture(scope="module")
def base() -> Dict[str, Obj]:
    return by_kind(render(KUBE))


def daemonset_container(objs: Dict[str, Obj]) -> Obj:
    containers = objs["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: Obj = containers[0]
    return c


# --- rendering ------------------------------------------------------------------------------------
def test_render_agrees_with_kubectl_kustomize(variant: str) -> None:
    ours = sorted(render(variant), key=key)
    theirs = kubectl_kustomize(variant)
    if theirs is None:
        missing_tool("kubectl with kustomize v4+ is not installed (here: the kubectl of google-cloud-cli; "
                     "Debian's kubernetes-client 1.20 carries kustomize v2, which has no components)")
    assert theirs is not None
    assert ours == sorted(theirs, key=key)


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Any) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonAnnotations: {a: b}\n")
    with pytest.raises(KustomizeError, match="commonAnnotations"):
        render(str(tmp_path))


def test_variants_contain_what_they_say(everything: str) -> None:
    assert sorted(key(o) for o in render(KUBE)) == [
        ("DaemonSet", "rsttrace"), ("Namespace", "rsttrace"), ("Service", "rsttrace"), ("ServiceAccount", "rsttrace")]
    mon = by_kind(render(VARIANTS["monitoring"]))
    assert set(mon) == {"DaemonSet", "Namespace", "Service", "ServiceAccount", "PodMonitor", "PrometheusRule"}
    assert {o["metadata"].get("namespace") for k, o in mon.items() if k != "Namespace"} == {"rsttrace"}
    full = by_kind(render(everything))
    c = daemonset_container(full)
    assert "SYS_ADMIN" in c["securityContext"]["capabilities"]["add"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is True
    tracefs = [m for m in c["volumeMounts"] if m["mountPath"] == "/sys/kernel/tracing"]
    assert tracefs == [{"name": "tracefs", "mountPath": "/sys/kernel/tracing", "readOnly": False}]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/lib/modules", "/usr/src"}


# --- schemas ------------------------------------------------------------------------------------
def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        missing_tool("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return kubernetes_validate


@pytest.mark.parametrize("version", [K8S_OLDEST, K8S_NEWEST])
def test_manifests_validate_against_the_kubernetes_schemas(variant: str, version: str) -> None:
    kv = kubernetes_validate()
    checked = 0
    for o in render(variant):
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: no schema bundled; checked by test_prometheus_operator_objects
        assert kv.validate(o, version, strict=True) == version, key(o)
        checked += 1
    assert checked >= 4


def test_validation_fetches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The schemas are in the package: a validation with every socket refused still works."""
    kv = kubernetes_validate()

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("kubernetes-validate tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    ds = copy.deepcopy(render(KUBE))
    for o in ds:
        kv.validate(o, K8S_OLDEST, strict=True)
    bad = copy.deepcopy(by_kind(ds)["DaemonSet"])
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = False
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_OLDEST, strict=True)


def test_api_server_rules_the_schemas_cannot_express(variant: str) -> None:
    objs = by_kind(render(variant))
    ds = objs["DaemonSet"]
    tmpl = ds["spec"]["template"]
    labels = tmpl["metadata"]["labels"]
    sel = ds["spec"]["selector"]["matchLabels"]
    assert sel.items() <= labels.items(), "selector must match the template"
    assert objs["Service"]["spec"]["selector"].items() <= labels.items()
    spec = tmpl["spec"]
    volumes = [v["name"] for v in spec["volumes"]]
    assert len(volumes) == len(set(volumes))
    for c in spec["containers"]:
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        assert len(mounts) == len(set(mounts))
        assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
        for m in c["volumeMounts"]:
            if m.get("recursiveReadOnly", "Disabled") != "Disabled":
                assert m.get("readOnly") and m.get("mountPropagation", "None") == "None"
        sc = c["securityContext"]
        if sc.get("allowPrivilegeEscalation") is False:
            # Validation rejects this pair when spelled CAP_SYS_ADMIN; accept neither spelling.
            assert not {"SYS_ADMIN", "CAP_SYS_ADMIN"} & set(sc["capabilities"].get("add", []))
            assert not sc.get("privileged")
        for p in c["ports"]:
            assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?", p["name"]) and re.search("[a-z]", p["name"])
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            port = c[probe]["httpGet"]["port"]
            assert isinstance(port, int) or port in {p["name"] for p in c["ports"]}
    assert spec["serviceAccountName"] == objs["ServiceAccount"]["metadata"]["name"]


# --- the container's command, and the port everything names ---------------------------------------
def container_port(c: Obj, port: Any) -> int:
    if isinstance(port, int):
        return port
    (n,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(n)


def parse_cli(args: List[str]) -> Any:
    try:
        return build_parser().parse_args(args)
    except SystemExit as e:  # argparse: an unknown flag or a bad value
        raise AssertionError("rsttrace rejects %s (exit %s)" % (args, e.code)) from None


def test_container_args_are_real_rsttrace_flags(base: Dict[str, Obj]) -> None:
    c = daemonset_container(base)
    assert "command" not in c, "the image's ENTRYPOINT is rsttrace; the manifest gives args only"
    args = parse_cli(c["args"])
    assert args.command == "export"
    assert args.metric_pod_labels and not args.no_attribution and not args.netns_label
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in (args.proc_root, args.cgroup_root, args.pods_dir, args.containers_dir):
        assert path in mounts and mounts[path].get("readOnly"), path
    assert args.log_format == "json"


def test_unknown_flags_fail_the_check(base: Dict[str, Obj]) -> None:
    args = daemonset_container(base)["args"] + ["--pod-labels"]
    with pytest.raises(AssertionError, match="rejects"):
        parse_cli(args)


def test_one_port_everywhere(base: Dict[str, Obj]) -> None:
    c = daemonset_container(base)
    host, port = parse_listen(parse_cli(c["args"]).listen)
    assert host == "0.0.0.0" and port == DEFAULT_PORT
    (metrics,) = c["ports"]
    assert metrics["containerPort"] == port and metrics["name"] == "metrics"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz"
        assert container_port(c, c[probe]["httpGet"]["port"]) == port
    (svc,) = base["Service"]["spec"]["ports"]
    assert svc["name"] == "metrics" and svc["port"] == port
    assert container_port(c, svc["targetPort"]) == port
    assert base["Service"]["spec"]["clusterIP"] == "None"
    ann = base["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def test_image_tag_is_the_package_version(base: Dict[str, Obj]) -> None:
    assert daemonset_container(base)["image"] == "rsttrace:" + __version__


# --- least privilege ----------------------------------------------------------------------------
EXPECTED_CAPS = ["BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE"]
HOST_MOUNTS = {  # host path -> where the container sees it
    "/sys/kernel/tracing": "/sys/kernel/tracing",
    "/proc": "/host/proc",
    "/sys/fs/cgroup": "/host/sys/fs/cgroup",
    "/var/log/pods": "/var/log/pods",
    "/var/log/containers": "/var/log/containers",
}


def test_least_privilege(base: Dict[str, Obj]) -> None:
    spec = base["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostPID"] is False and spec["hostNetwork"] is False and not spec.get("hostIPC")
    assert spec["automountServiceAccountToken"] is False
    assert base["ServiceAccount"]["automountServiceAccountToken"] is False
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = daemonset_container(base)
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": EXPECTED_CAPS}
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {}
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        if "hostPath" in v:
            assert m.get("readOnly") is True, m
            host[v["hostPath"]["path"]] = m["mountPath"]
        else:
            assert set(v) == {"name", "emptyDir"}, v  # the only writable places
    assert host == HOST_MOUNTS
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    env = {e["name"]: e for e in c["env"]}
    assert env["RSTTRACE_CACHE"]["value"] in writable and "/tmp" in writable
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert "limits" in c["resources"] and "memory" in c["resources"]["limits"]
    assert "cpu" not in c["resources"]["limits"]
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert base["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


# --- Prometheus Operator objects ------------------------------------------------------------------
PROMETHEUSRULE_HEADER = """\
# GENERATED from deploy/prometheus/rules.yml (its groups, unchanged): do not edit here. After editing
# rules.yml run `python3 tests/unit/test_kubernetes.py --write-prometheusrule`; a test compares them.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: rsttrace
  labels:
    app.kubernetes.io/name: rsttrace
spec:
"""


def prometheusrule_text(rules: str) -> str:
    lines = rules.splitlines()
    start = lines.index("groups:")
    return PROMETHEUSRULE_HEADER + "".join(("  " + ln).rstrip() + "\n" for ln in lines[start:])


def test_prometheusrule_is_rules_yml() -> None:
    with open(RULES) as f:
        rules = f.read()
    with open(PROMETHEUSRULE) as f:
        ours = f.read()
    assert ours == prometheusrule_text(rules), "run: python3 tests/unit/test_kubernetes.py --write-prometheusrule"
    assert yaml.safe_load(ours)["spec"]["groups"] == yaml.safe_load(rules)["groups"]


def test_prometheus_operator_objects() -> None:
    objs = by_kind(render(VARIANTS["monitoring"]))
    pm = objs["PodMonitor"]
    tmpl = objs["DaemonSet"]["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= tmpl["metadata"]["labels"].items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] in {p["name"] for p in tmpl["spec"]["containers"][0]["ports"]}
    assert ep["path"] == "/metrics"
    rule = objs["PrometheusRule"]
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"} and set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for r in group["rules"]:
            assert set(r) <= {"record", "alert", "expr", "for", "labels", "annotations"}
            assert ("record" in r) != ("alert" in r) and isinstance(r["expr"], str)


# --- the image ----------------------------------------------------------------------------------
def containerfile() -> List[Tuple[str, str]]:
    """(instruction, argument) pairs, continuation lines joined, comments dropped."""
    with open(CONTAINERFILE) as f:
        text = re.sub(r"\\\n", " ", "".join(ln for ln in f if not ln.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            instr, _, arg = line.strip().partition(" ")
            out.append((instr.upper(), " ".join(arg.split())))
    return out


def install_packages() -> Set[str]:
    """The packages scripts/install always installs (not its headers choice, made per machine)."""
    with open(os.path.join(ROOT, "scripts", "install")) as f:
        m = re.search(r"^pkgs=\(([^)]*)\)", f.read(), re.M)
    assert m, "scripts/install no longer has a pkgs=(...) line"
    return set(m.group(1).split())


def apt_packages() -> List[str]:
    runs = [a for i, a in containerfile() if i == "RUN" and "apt-get install" in a]
    assert len(runs) == 1
    words = shlex.split(runs[0].split("apt-get install", 1)[1].split("&&")[0])
    return [w for w in words if not w.startswith("-")]


def test_containerfile_statically() -> None:
    steps = containerfile()
    assert steps[:2] == [("ARG", "BASE=debian:bookworm-slim"), ("FROM", "${BASE}")]  # deploy/image/build passes BASE
    pkgs = apt_packages()
    assert install_packages() <= set(pkgs), "the image lacks packages scripts/install installs"
    assert "linux-headers-$(dpkg --print-architecture)" in pkgs
    runs = " && ".join(a for i, a in steps if i == "RUN")
    assert "/usr/bin/python3 -m venv --system-site-packages /opt/rsttrace/venv" in runs  # as scripts/install
    assert "rm -rf /var/lib/apt/lists/*" in runs
    copies = [a.split() for i, a in steps if i == "COPY"]
    for *srcs, _dst in copies:
        for s in srcs:
            assert os.path.exists(os.path.join(ROOT, s)), s
    assert ["deploy/image/rsttrace", "/usr/local/bin/rsttrace"] in copies
    assert os.access(WRAPPER, os.X_OK)
    instr = dict(steps)
    assert json.loads(instr["ENTRYPOINT"]) == ["rsttrace"]
    cmd = parse_cli(json.loads(instr["CMD"]))
    assert cmd.command == "export" and parse_listen(cmd.listen)[1] == DEFAULT_PORT
    assert instr["EXPOSE"] == str(DEFAULT_PORT)
    assert "RSTTRACE_CACHE=/var/cache/rsttrace" in instr["ENV"]


def test_build_context_keeps_what_copy_takes() -> None:
    """.dockerignore (read by docker, podman and buildah) excludes all but the COPY sources."""
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        keep = {ln[1:].strip() for ln in f if ln.startswith("!")}
    for i, a in containerfile():
        if i == "COPY":
            assert set(a.split()[:-1]) <= keep


def test_apt_step_resolves() -> None:
    """apt resolves the image's package list on this Debian (a simulation: nothing installed)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        missing_tool("apt-get and dpkg are needed to resolve the Containerfile's packages")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    pkgs = [p.replace("$(dpkg --print-architecture)", arch) for p in apt_packages()]
    with tempfile.NamedTemporaryFile() as empty:  # as on debian:bookworm-slim: resolve every dependency
        out = subprocess.run(["apt-get", "install", "-s", "-q", "--no-install-recommends",
                              "-o", "Dir::State::status=" + empty.name, *pkgs],
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    installed = {ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("Inst ")}
    assert {"python3-bpfcc", "libbpfcc", "python3-venv", "linux-headers-" + arch} <= installed
    assert any(re.fullmatch(r"linux-headers-.*-common", p) for p in installed)


def run_steps(prefix: str, usr_src: str, build_src: str) -> str:
    """The Containerfile's steps after apt-get, with its paths moved into a temporary tree."""
    script = ["set -eux"]
    for instr, arg in containerfile():
        if instr == "COPY":
            *srcs, dst = arg.split()
            if dst.startswith("/usr/local/bin"):
                continue  # the wrapper: run from the repository
            dst = dst.replace("/tmp/rsttrace-src", build_src)
            script.append("mkdir -p %s" % shlex.quote(dst if dst.endswith("/") else os.path.dirname(dst)))
            for s in srcs:
                script.append("cp -r %s %s" % (shlex.quote(os.path.join(ROOT, s)), shlex.quote(dst)))
        elif instr == "RUN" and "apt-get" not in arg:
            script.append(arg.replace("/opt/rsttrace", prefix).replace("/tmp/rsttrace-src", build_src)
                          .replace("/usr/src", usr_src))
    return "\n".join(script) + "\n"


@pytest.fixture(scope="module")
def image_prefix(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/opt/rsttrace as the Containerfile builds it, here (pip fetches from PyPI)."""
    if not os.path.isfile("/usr/lib/python3/dist-packages/bcc/__init__.py") or not os.path.exists("/usr/bin/python3"):
        missing_tool("python3-bpfcc is not installed (scripts/install installs it)")
    base = str(tmp_path_factory.mktemp("image"))
    prefix, usr_src, build_src = (os.path.join(base, d) for d in ("opt-rsttrace", "usr-src", "rsttrace-src"))
    os.makedirs(usr_src)
    headers = [d for d in os.listdir("/usr/src") if d.startswith("linux-headers-")]
    if not headers:
        missing_tool("no kernel headers under /usr/src (scripts/install installs them)")
    for d in headers:  # stand-ins the step moves, pointing at the real trees
        os.symlink(os.path.join("/usr/src", d), os.path.join(usr_src, d))
    # an image build's environment: nothing of this process's (a BCC_KERNEL_SOURCE would be
    # taken as the headers to link)
    env = {k: v for k, v in os.environ.items() if k != "BCC_KERNEL_SOURCE"}
    out = subprocess.run(["sh", "-c", run_steps(prefix, usr_src, build_src)], capture_output=True, text=True,
                         timeout=600, env=dict(env, PIP_NO_INPUT="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    return prefix


def test_run_steps_build_the_image_tree(image_prefix: str) -> None:
    venv_py = os.path.join(image_prefix, "venv", "bin", "python")
    out = subprocess.run([venv_py, "-c", "import bcc, rsttrace, sys; print(rsttrace.__version__, sys.version_info[0])"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == [__version__, "3"], out.stderr
    headers = os.path.join(image_prefix, "kernel-headers")
    assert os.path.islink(headers)
    for f in ("include/linux/types.h", "include/generated/autoconf.h", "arch/x86/include/asm/ptrace.h"):
        assert os.path.isfile(os.path.join(headers, f)), f
    assert os.path.realpath(os.path.join(headers, "include/linux/types.h")).startswith(os.path.realpath("/usr/src"))
    v = subprocess.run([WRAPPER, "--version"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, RSTTRACE_PREFIX=image_prefix))
    assert v.returncode == 0 and v.stdout.strip() == "rsttrace " + __version__, v.stderr


def wrapper_choice(prefix: str, env: Optional[Dict[str, str]] = None) -> str:
    fake = os.path.join(prefix, "venv", "bin")
    os.makedirs(fake, exist_ok=True)
    os.makedirs(os.path.join(prefix, "kernel-headers", "include"), exist_ok=True)
    with open(os.path.join(fake, "rsttrace"), "w") as f:
        f.write('#!/bin/sh\necho "BCC_KERNEL_SOURCE=${BCC_KERNEL_SOURCE:-} $*"\n')
    os.chmod(os.path.join(fake, "rsttrace"), 0o755)
    clean = {k: v for k, v in os.environ.items() if k != "BCC_KERNEL_SOURCE"}
    out = subprocess.run([WRAPPER, "export", "--x"], capture_output=True, text=True, check=True,
                         env=dict(clean, RSTTRACE_PREFIX=prefix, **(env or {})))
    return out.stdout.strip()


def test_wrapper_prefers_the_nodes_headers(tmp_path: Any) -> None:
    prefix = str(tmp_path)
    node_has = os.path.isdir("/lib/modules/%s/build/include" % os.uname().release) or os.path.exists(
        "/sys/kernel/kheaders.tar.xz")
    want = "" if node_has else os.path.join(prefix, "kernel-headers")
    assert wrapper_choice(prefix) == "BCC_KERNEL_SOURCE=%s export --x" % want
    assert wrapper_choice(prefix, {"BCC_KERNEL_SOURCE": "/x"}) == "BCC_KERNEL_SOURCE=/x export --x"


# --- the DaemonSet's command in a simulated pod (root, BPF) -----------------------------------------
# The pod's process drops to uid 1000, as a runtime starts a pod's process (dumpable, not root):
# reading its /proc/<pid>/ns/net then takes SYS_PTRACE.
SERVER_AS_USER = """
import os, socket, time
os.setgroups([])
os.setgid(1000)
os.setuid(1000)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(8); print(s.getsockname()[1], flush=True)
time.sleep(600)
"""


def user_pod_at(tmp: str) -> Any:
    from tests.real.kubelet import KubeletPod

    p = KubeletPod(tmp, SERVER_AS_USER, name="cart-5c8d")
    with open("/proc/%d/status" % p.proc.pid) as f:
        assert re.search(r"^Uid:\s+1000\s", f.read(), re.M)
    return p


def sandbox_script(c: Obj, spec: Obj, rootfs: str, caps: List[str], sources: Dict[str, str],
                   binds: List[str], env: Dict[str, str], argv: List[str]) -> str:
    """Shell run under `unshare --mount --net --pid --fork`: the pod's filesystem, then its command."""
    q = shlex.quote
    r = rootfs
    lines = ["set -eu", "mount -t tmpfs -o mode=755 rootfs %s" % q(r)]
    for link in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink("/" + link):
            lines.append("ln -s %s %s" % (q(os.readlink("/" + link)), q(os.path.join(r, link))))
    lines += ["mkdir -p %s/proc %s/sys %s/dev" % (q(r), q(r), q(r)),
              "mount -t proc proc %s/proc" % q(r),  # this pid namespace's, as a runtime mounts it
              "mount -t sysfs -o ro sysfs %s/sys" % q(r),  # this network namespace's, read-only
              "mount --rbind /dev %s/dev" % q(r),
              "ip link set lo up"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c["volumeMounts"]:
        v, dst = volumes[m["name"]], q(r + m["mountPath"])
        lines.append("mkdir -p %s" % dst)
        if "emptyDir" in v:
            lines.append("mount -t tmpfs -o mode=1777 %s %s" % (q(m["name"]), dst))
            continue
        src = sources.get(v["hostPath"]["path"], v["hostPath"]["path"])
        lines.append("mount --rbind %s %s" % (q(src), dst))  # a kubelet hostPath is an rbind
        if m.get("readOnly"):
            lines.append("mount -o remount,bind,ro %s" % dst)
    for d in binds:  # the image's files, read-only (after the volumes: the test's paths may be under /tmp)
        lines += ["mkdir -p %s" % q(r + d), "mount --rbind %s %s" % (q(d), q(r + d)),
                  "mount -o remount,bind,ro %s" % q(r + d)]
    if c["securityContext"].get("readOnlyRootFilesystem"):
        lines.append("mount -o remount,ro %s" % q(r))
    setpriv = ["setpriv", "--bounding-set", ",".join(["-all"] + ["+" + x.lower() for x in caps]),
               "--inh-caps", "-all"]
    if c["securityContext"].get("allowPrivilegeEscalation") is False:
        setpriv.append("--no-new-privs")
    lines.append("exec chroot %s /usr/bin/env -i %s %s -- %s" % (
        q(r), " ".join(q("%s=%s" % kv) for kv in sorted(env.items())), " ".join(map(q, setpriv)),
        " ".join(map(q, argv))))
    return "\n".join(lines) + "\n"


class SimulatedPod:
    def __init__(self, objs: Dict[str, Obj], image_prefix: str, pod: Any, caps: List[str], tmp: str) -> None:
        spec = objs["DaemonSet"]["spec"]["template"]["spec"]
        c = daemonset_container(objs)
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",  # the image's ENV
               "RSTTRACE_PREFIX": image_prefix}  # the image has it at the default, /opt/rsttrace
        for e in c["env"]:
            env[e["name"]] = e.get("value", "sim-node")  # NODE_NAME: from the downward API
        rootfs = os.path.join(tmp, "rootfs")
        os.makedirs(rootfs)
        binds = ["/usr", "/etc", image_prefix, ROOT]  # /usr: python3 and bcc; ROOT: the wrapper
        sources = {"/var/log/pods": pod.pods_dir, "/var/log/containers": pod.containers_dir}
        script = sandbox_script(c, spec, rootfs, caps, sources, binds, env, [WRAPPER] + c["args"])
        self.stderr_path = os.path.join(tmp, "stderr")
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(["unshare", "--mount", "--net", "--pid", "--fork", "--propagation", "private",
                                          "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=err)
        self.port = parse_listen(parse_cli(c["args"]).listen)[1]
        self.netns = ""
        end = time.monotonic() + 30
        while time.monotonic() < end and not self.netns:
            try:
                with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                    child = f.read().split()
                if child:
                    ns = "/proc/%s/ns/net" % child[0]
                    if os.stat(ns).st_ino != os.stat("/proc/self/ns/net").st_ino:
                        self.netns = ns
            except OSError:
                pass
            time.sleep(0.05)
        assert self.netns, "the sandbox did not start: " + self.log()

    def log(self, tail: int = 4000) -> str:
        with open(self.stderr_path) as f:
            return f.read()[-tail:] if tail else f.read()

    def get(self, path: str) -> Tuple[int, str]:
        from rsttrace.kernel import netns as nsmod

        def fetch() -> Tuple[int, str]:
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.port, path), timeout=5) as r:
                    return int(r.status), str(r.read().decode())
            except urllib.error.HTTPError as e:
                return int(e.code), ""
            except OSError:
                return 0, ""

        return nsmod.run_in(self.netns, fetch)

    def wait_healthy(self, timeout: float = 180.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError("rsttrace exited %s in the pod:\n%s" % (self.proc.returncode, self.log()))
            if self.get("/healthz")[0] == 200:
                return
            time.sleep(0.2)
        raise AssertionError("/healthz not 200 after %.0fs:\n%s" % (timeout, self.log()))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                    for child in f.read().split():
                        os.kill(int(child), signal.SIGTERM)  # as the kubelet stops a container
            except OSError:
                pass  # it has just exited
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sample(text: str, name: str, labels: Dict[str, str]) -> float:
    for line in text.splitlines():
        if not labels and line.startswith(name + " "):
            return float(line.split()[1])
        if line.startswith(name + "{"):
            body, _, value = line.rpartition(" ")
            got = dict(kv.split("=", 1) for kv in body[len(name) + 1:-1].split(","))
            if {k: v.strip('"') for k, v in got.items()} == labels:
                return float(value)
    return 0.0


def wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


@pytest.fixture()
def user_pod(tmp_path: Any) -> Iterator[Any]:
    from tests.real.realkernel import require_real_kernel

    require_real_kernel()
    for tool in ("unshare", "setpriv", "chroot", "ip"):
        if shutil.which(tool) is None:
            pytest.fail("%s is missing (util-linux, coreutils, iproute2)" % tool)
    p = user_pod_at(str(tmp_path))
    yield p
    p.close()


def resets_in(pod: Any, n: int) -> None:
    from tests.real.netlab import closed_port, connect_refused

    with pod.ns.inside():
        connect_refused(socket.AF_INET, "127.0.0.1", closed_port(socket.AF_INET, "127.0.0.1"), n)


@pytest.mark.root
@pytest.mark.parametrize("ptrace", [True, False], ids=["as-manifested", "without-SYS_PTRACE"])
def test_daemonset_runs_in_a_simulated_pod(base: Dict[str, Obj], image_prefix: str, user_pod: Any,
                                           tmp_path: Any, ptrace: bool) -> None:
    caps = daemonset_container(base)["securityContext"]["capabilities"]["add"]
    if not ptrace:
        caps = [x for x in caps if x != "SYS_PTRACE"]
    sim = SimulatedPod(base, image_prefix, user_pod, caps, str(tmp_path))
    try:
        sim.wait_healthy()
        _, metrics = sim.get("/metrics")
        attached = [ln for ln in metrics.splitlines() if ln.startswith("rsttrace_program_attached{")]
        assert attached and all(ln.endswith(" 1.0") for ln in attached), attached
        resets_in(user_pod, 3)
        labels = {"reason": "NO_SOCKET", "reason_source": "kernel", "state": "", "family": "ipv4",
                  "namespace": user_pod.namespace if ptrace else "", "pod": user_pod.name if ptrace else ""}
        ok = wait_for(lambda: sample(sim.get("/metrics")[1], "rsttrace_tcp_resets_sent_total", labels) == 3, 15)
        assert ok, [ln for ln in sim.get("/metrics")[1].splitlines() if ln.startswith("rsttrace_tcp_resets_sent")]
    finally:
        sim.close()
    log = sim.log(tail=0)
    assert sim.proc.returncode == 0, log[-4000:]
    ready = [json.loads(ln) for ln in log.splitlines() if ln.startswith("{") and '"ready"' in ln]
    assert ready, log[-4000:]
    if not os.path.isdir("/lib/modules/%s/build/include" % os.uname().release):
        assert ready[0]["headers"].startswith("BCC_KERNEL_SOURCE=" + os.path.join(image_prefix, "kernel-headers"))


@pytest.mark.root
def test_simulated_pod_sees_the_hosts_counters(base: Dict[str, Obj], image_prefix: str, user_pod: Any,
                                                tmp_path: Any) -> None:
    from rsttrace.kernel import procnet

    sim = SimulatedPod(base, image_prefix, user_pod,
                       daemonset_container(base)["securityContext"]["capabilities"]["add"], str(tmp_path))
    try:
        sim.wait_healthy()
        host = procnet.get(procnet.read("/proc/1/net"), "Tcp", "OutRsts")
        assert host > 0
        _, metrics = sim.get("/metrics")
        assert sample(metrics, "rsttrace_kernel_tcp_out_rsts_total", {}) >= host
    finally:
        sim.close()


@pytest.mark.root
def test_simulated_pod_sees_other_pods_syn_overflows(base: Dict[str, Obj], image_prefix: str, user_pod: Any,
                                                      tmp_path: Any) -> None:
    from tests.real.netlab import overflow_accept_queue

    sim = SimulatedPod(base, image_prefix, user_pod,
                       daemonset_container(base)["securityContext"]["capabilities"]["add"], str(tmp_path))
    try:
        sim.wait_healthy()
        with user_pod.ns.inside():
            _, socks = overflow_accept_queue("127.0.0.1", clients=8, backlog=1)
        try:
            pod = 'namespace="%s",pod="%s"' % (user_pod.namespace, user_pod.name)

            def seen() -> bool:
                return any(ln.startswith('rsttrace_tcp_listen_overflows_total{kind="syn"') and pod in ln
                           for ln in sim.get("/metrics")[1].splitlines())

            assert wait_for(seen, 10)
        finally:
            for s in socks:
                s.close()
    finally:
        sim.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-prometheusrule"]:
        with open(RULES) as f, open(PROMETHEUSRULE, "w") as out:
            out.write(prometheusrule_text(f.read()))
        print("wrote", os.path.relpath(PROMETHEUSRULE, ROOT))
    else:
        sys.exit("usage: python3 tests/unit/test_kubernetes.py --write-prometheusrule")
