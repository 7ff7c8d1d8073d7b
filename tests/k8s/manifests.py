"""The manifests as kustomize renders them, their CRD schemas (jsonschema, strict), facts about the objects, and the
Dockerfile: what the k8s checks and tests read."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from jsonschema import Draft4Validator, ValidationError, validators
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_DIR = Path(os.environ.get("RAY_VDR_KUBERAY_CRDS") or ROOT / "tests" / "data" / "kuberay-crds")
SHARED_CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"

# Every kustomization and whether its clusters have GPUs (a new overlay must be added here to be validated).
USES_GPU = {"base": True, "overlays/multi-gpu": True, "overlays/dev-cpu": False, "overlays/sharded-index": True,
            "overlays/multi-vector": True}
PIPELINE = ("train_embedder", "embed_corpus", "mine_negatives", "train_reranker", "evaluate")
# The pipeline's steps in order; training data from one's own documents (before it) and model promotion (after a new
# training run).
JOBS = ("make_training_data", *PIPELINE, "promote", "benchmark")
# Overrides each job's entrypoint must set, so that bucket names and the endpoint's address live in k8s/ only.
NEEDED_OVERRIDES = {"embed_corpus": {"index.sources"}, "promote": {"serve.index", "serve.live", "promote.endpoint"},
                    "make_training_data": {"queries.sources", "queries.output"},
                    "benchmark": {"benchmark.tasks", "benchmark.data_dir"}}
GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
REMOTE = ("s3://", "gs://")
OBJECT_STORE_FRACTION = 0.3  # Ray's default object store size: 30% of the node's memory, placed in /dev/shm
# Fields of the Serve args that may differ from serving/config.yaml, a documented difference each (k8s/README.md).
SERVE_ARGS_MAY_DIFFER = re.compile(
    r"(index|model|reranker|live|index_poll_s)"
    r"|(embedder|retriever|rerank|ingress)\.(min_replicas|max_replicas|num_cpus|num_gpus)"
    r"|retriever\.(shards|shard_resources|shard_timeout_s)"  # a sharded index's endpoint (overlays/sharded-index)
)


# ---------------------------------------------------------------------------------------------------------------------
# Rendering: kustomize


def kustomize() -> list[str]:
    """The command that renders a kustomization folder: a standalone kustomize if there is one, else kubectl's."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("rendering k8s/ needs kustomize: install kubectl (`kubectl kustomize` is built in) or kustomize "
                "(https://kubectl.docs.kubernetes.io/installation/kustomize/) on PATH", pytrace=False)


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k folder` would apply. A kustomization kustomize refuses raises its message."""
    command = [*kustomize(), str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def idle_patches(folder: Path) -> list[str]:
    """The patches of the kustomization in ``folder`` without which kustomize renders the same objects (it skips a
    patch whose target matches nothing). Rewrites folder/kustomization.yaml: call it on a copy."""
    path = folder / "kustomization.yaml"
    text = path.read_text()
    kustomization = yaml.safe_load(text)
    patches, objects = kustomization.get("patches") or [], render(folder)
    idle = []
    for i, patch in enumerate(patches):
        path.write_text(yaml.safe_dump({**kustomization, "patches": patches[:i] + patches[i + 1:]}))
        if render(folder) == objects:
            idle.append(f"patches[{i}] (target {patch.get('target')}) changes nothing")
    path.write_text(text)
    return idle


def kustomizations() -> list[str]:
    """Every kustomization under k8s/, relative to it."""
    return sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))


@functools.cache
def _rendered(name: str) -> list[dict[str, Any]]:
    return render(K8S / name)


def rendered(name: str) -> list[dict[str, Any]]:
    """A fresh copy of the rendered kustomization (tests mutate what they get)."""
    return copy.deepcopy(_rendered(name))


# ---------------------------------------------------------------------------------------------------------------------
# Schema validation: the CRDs' OpenAPI v3 schemas with jsonschema


# Kubernetes validates ObjectMeta itself (the CRDs leave it a bare object). KubeRay derives Service and Pod names
# from these names, so they must be DNS-1035 labels, and it refuses names longer than 47 characters.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 47},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _strict_type(validator, types, instance, schema):
    """OpenAPI 3.0's type (`nullable` included), made strict: an object's fields its schema does not declare are
    errors (the API server would prune them, and `kubectl apply --validate=strict` refuses them)."""
    yield from OAS30Validator.VALIDATORS["type"](validator, types, instance, schema)
    if (types == "object" and validator.is_type(instance, "object") and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        yield from Draft4Validator.VALIDATORS["additionalProperties"](validator, False, instance, schema)


def _int_or_string(validator, enabled, instance, schema):
    if enabled and not (validator.is_type(instance, "integer") or validator.is_type(instance, "string")):
        yield ValidationError(f"{instance!r} is neither an integer nor a string (x-kubernetes-int-or-string)")


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: the items of a `map` list are unique by their keys, those of a `set` list unique."""
    if not validator.is_type(instance, "array") or list_type not in ("map", "set"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = [json.dumps([item.get(k) for k in keys] if list_type == "map" else item, sort_keys=True)
            for item in instance]
    for key in sorted({key for key in seen if seen.count(key) > 1}):
        yield ValidationError(f"duplicate item {key} in a list of type {list_type}")


def _cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations are CEL rules the API server evaluates. This test cannot evaluate them, so a field
    guarded by one is refused rather than waved through."""
    yield ValidationError(f"sets a field with CEL rules this test cannot evaluate: {[r['rule'] for r in rules]}")


Validator = validators.extend(OAS30Validator, {
    "type": _strict_type, "x-kubernetes-int-or-string": _int_or_string, "x-kubernetes-list-type": _list_type,
    "x-kubernetes-validations": _cel_rules,
})


@functools.cache
def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → the served version's openAPIV3Schema, for every CRD file in CRD_DIR."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML: libyaml parses them in ~1 s
    found = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                api_version = f"{crd['spec']['group']}/{version['name']}"
                found[(api_version, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return found


@functools.cache
def validator_for(api_version: str, kind: str):
    raw = _crds().get((api_version, kind))
    if raw is None:
        return None
    schema = {**raw, "properties": {**raw["properties"], "metadata": OBJECT_META},
              "required": sorted({*raw.get("required", []), "apiVersion", "kind", "metadata", "spec"})}
    return Validator(schema, format_checker=oas30_format_checker)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """What a strict API server would refuse in ``obj``, one line per error."""
    validator = validator_for(obj.get("apiVersion", ""), obj.get("kind", ""))
    if validator is None:
        return [f"no CRD in {CRD_DIR} for apiVersion {obj.get('apiVersion')!r} kind {obj.get('kind')!r}"]
    return [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


# ---------------------------------------------------------------------------------------------------------------------
# Facts about the objects


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("10", "500m", "60Gi", 4) as a number."""
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)(Ki|Mi|Gi|Ti|[mkMGT]?)", str(value))
    if match is None:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * units[match.group(2)]


def cluster_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, RayCluster spec) for every cluster the objects create."""
    out = []
    for obj in objects:
        spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s.get("rayClusterSpec"),
                "RayService": lambda s: s.get("rayClusterConfig")}[obj["kind"]](obj["spec"])
        if spec is not None:
            out.append((f"{obj['kind']}/{obj['metadata']['name']}", spec))
    return out


def pod_groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    return [("head", spec["headGroupSpec"]), *((g["groupName"], g) for g in spec.get("workerGroupSpecs", []))]


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def pod_resources(group: dict[str, Any]) -> tuple[float, float]:
    """(Ray CPUs, GPUs) of one pod of a group, as `ray start` will see them."""
    params = group.get("rayStartParams", {})
    limits = ray_container(group).get("resources", {}).get("limits", {})
    cpus = float(params["num-cpus"]) if "num-cpus" in params else quantity(limits.get("cpu", 0))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else quantity(limits.get(GPU, 0))
    return cpus, gpus


def capacity(spec: dict[str, Any]) -> dict[str, float]:
    """What a cluster offers at its largest: total GPUs and CPUs, and the CPUs of its smallest GPU pod."""
    autoscaling = spec.get("enableInTreeAutoscaling", False)
    cpus, head_gpus = pod_resources(spec["headGroupSpec"])
    total = {"cpus": cpus, "gpus": head_gpus, "gpu_pod_cpus": float("inf")}
    for group in spec.get("workerGroupSpecs", []):
        n = group["maxReplicas"] if autoscaling else group.get("replicas", 0)
        pod_cpus, pod_gpus = pod_resources(group)
        total["cpus"] += n * pod_cpus
        total["gpus"] += n * pod_gpus
        if pod_gpus and n:
            total["gpu_pod_cpus"] = min(total["gpu_pod_cpus"], pod_cpus)
    return total


def images(objects: list[dict[str, Any]]) -> set[str]:
    found = set()
    for _, spec in cluster_specs(objects):
        for _, group in pod_groups(spec):
            found |= {c["image"] for c in group["template"]["spec"].get("containers", [])}
    for obj in objects:
        submitter = obj["spec"].get("submitterPodTemplate")
        if submitter:
            found |= {c["image"] for c in submitter["spec"]["containers"]}
    return found


def pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_requirement() -> Requirement:
    reqs = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    return next(r for r in reqs if r.name == "ray")


def ray_version() -> str:
    return metadata.version("ray")


def image_tag() -> str:
    """The tag of the image every manifest uses: <project version>-ray<Ray version>."""
    return f"{pyproject()['project']['version']}-ray{ray_version()}"


def image_name() -> str:
    """The one image of the base manifests (any registry; its tag is checked by version_problems)."""
    found = images(rendered("base"))
    assert len(found) == 1, f"the base manifests use several images: {sorted(found)}"
    return found.pop()


# ---------------------------------------------------------------------------------------------------------------------
# The Dockerfile


def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    return [(i["instruction"], i["value"]) for i in dockerfile().structure if i["instruction"] != "COMMENT"]


def dockerfile_base() -> dict[str, str]:
    parser = dockerfile()
    assert len(parser.parent_images) == 1, f"one build stage expected, got FROM {parser.parent_images}"
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>gpu|cu\d+)",
                         parser.baseimage)
    assert match, f"FROM {parser.baseimage!r} is not a pinned Ray GPU image (rayproject/ray:<x.y.z>-py3XX-gpu)"
    return match.groupdict()


def dockerfile_workdir() -> str:
    workdirs = [args for instr, args in instructions() if instr == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1]


# ---------------------------------------------------------------------------------------------------------------------
# Monitoring: k8s/monitoring (not a kustomization: prometheus-operator's CRDs are not KubeRay's)

MONITORING = K8S / "monitoring"
METRIC_NAME = re.compile(r"\b(ray_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\b")


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def podmonitor() -> dict[str, Any]:
    return yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())


def dashboard_queries(board: dict[str, Any]) -> dict[str, list[str]]:
    """Panel title → its PromQL expressions."""
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in board["panels"]}


def dashboard_metrics(board: dict[str, Any]) -> set[str]:
    """The metric names the dashboard's panels and variables query, as a scrape names them (histograms by their
    family: ``ray_vdr_stage_latency_ms_bucket`` is ``ray_vdr_stage_latency_ms``)."""
    exprs = [e for es in dashboard_queries(board).values() for e in es]
    exprs += [v.get("query", "") for v in board.get("templating", {}).get("list", []) if v.get("type") == "query"]
    return {m for e in exprs for m in METRIC_NAME.findall(e)}


def shard_placement_problems(cfg, spec: dict[str, Any]) -> list[str]:
    """Every Ray resource a shard group asks for is offered by a worker group, enough for its replicas (a shard
    group no pod offers would never get a replica: every search a 503)."""
    offered: dict[str, float] = {}
    for group in spec.get("workerGroupSpecs", []):
        text = (group.get("rayStartParams") or {}).get("resources")
        if text:
            try:
                found = json.loads(json.loads(text)) if text.startswith('"') else json.loads(text)
            except json.JSONDecodeError as e:
                return [f"worker group {group['groupName']}: rayStartParams.resources is not JSON: {e}"]
            for name, amount in found.items():
                offered[name] = offered.get(name, 0.0) + amount * group.get("maxReplicas", group.get("replicas", 0))
    wanted: dict[str, float] = {}
    shards = cfg.retriever.shards or 1
    for i in range(shards if cfg.retriever.shard_resources else 0):
        for name, amount in cfg.retriever.shard_resources[i % len(cfg.retriever.shard_resources)].items():
            wanted[name] = wanted.get(name, 0.0) + amount * cfg.retriever.max_replicas
    return [f"retriever.shard_resources asks for {amount} {name} at max_replicas; the worker groups offer "
            f"{offered.get(name, 0.0)}" for name, amount in sorted(wanted.items()) if amount > offered.get(name, 0.0)]


def shm_problems(where: str, group: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """/dev/shm must be a memory-backed emptyDir that can hold Ray's object store and still fit the pod's memory."""
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    empty_dir = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir")
    if not empty_dir or empty_dir.get("medium") != "Memory" or "sizeLimit" not in empty_dir:
        return [f"{where}: /dev/shm must be an emptyDir with medium Memory and a sizeLimit"]
    memory = quantity(container["resources"]["limits"]["memory"])
    shm = quantity(empty_dir["sizeLimit"])
    store = quantity(group.get("rayStartParams", {}).get("object-store-memory", OBJECT_STORE_FRACTION * memory))
    if not store <= shm < memory:
        return [f"{where}: /dev/shm {empty_dir['sizeLimit']} must hold the object store ({store / 2**30:.1f}Gi) "
                f"and stay below the memory limit"]
    return []
