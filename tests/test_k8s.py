"""KubeRay manifests (k8s/) and the runtime image (Dockerfile), checked against the CRDs and the code. No cluster
and no network are needed.

Each kustomization (k8s/base, k8s/overlays/*) is rendered as `kubectl apply -k` renders it, by a small renderer that
supports `resources` and JSON 6902 `patches` and refuses every other kustomize feature (k8s/README.md lists its
limits). Every rendered object is validated against the ray.io/v1 schema of its KubeRay CRD in strict mode: fields
the schema does not declare are errors, as with `kubectl apply --validate=strict`. The CRDs come from
tests/data/kuberay-crds, or from the folder named by RAY_VDR_KUBERAY_CRDS.

The schema cannot check the rest, so the tests below do:
- each entrypoint names a jobs/ script and a config, and its overrides load with ray_vdr's own config loader;
- the jobs of one kustomization agree on the run, bucket and models, and they fit the cluster they bring;
- the RayService runs serving/config.yaml's application, differing only where documented;
- the promote job switches that RayService: it writes the live manifest the endpoint follows, starts from the index
  it serves, and waits for the switch at its Service;
- GPU groups request and tolerate GPUs, and every copy of the cluster spec agrees;
- /dev/shm is sized for the object store;
- one image and one Ray version are used everywhere, equal to pyproject's pin, the Dockerfile's base and the
  installed ray.
The last tests break manifests on purpose and check that each of these checks notices.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import re
import shlex
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ray_vdr.cli import add_config_args, config_from_args
from ray_vdr.config import ConfigError, ServeConfig, VDRConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
CRD_DIR = Path(os.environ.get("RAY_VDR_KUBERAY_CRDS") or ROOT / "tests" / "data" / "kuberay-crds")
SHARED_CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"

# Every kustomization and whether its clusters have GPUs (a new overlay must be added here to be validated).
USES_GPU = {"base": True, "overlays/multi-gpu": True, "overlays/dev-cpu": False}
PIPELINE = ("train_embedder", "embed_corpus", "mine_negatives", "train_reranker", "evaluate")
JOBS = (*PIPELINE, "promote")  # the pipeline's steps, in order, and model promotion (run after a new training run)
# Overrides each job's entrypoint must set, so that bucket names and the endpoint's address live in k8s/ only.
NEEDED_OVERRIDES = {"embed_corpus": {"index.sources"}, "promote": {"serve.index", "serve.live", "promote.endpoint"}}
GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
REMOTE = ("s3://", "gs://")
OBJECT_STORE_FRACTION = 0.3  # Ray's default object store size: 30% of the node's memory, placed in /dev/shm
# Fields of the Serve args that may differ from serving/config.yaml, a documented difference each (k8s/README.md).
SERVE_ARGS_MAY_DIFFER = re.compile(
    r"(index|model|reranker|live|index_poll_s)"
    r"|(embedder|retriever|rerank|ingress)\.(min_replicas|max_replicas|num_cpus|num_gpus)"
)


class RenderError(Exception):
    """A kustomization this renderer cannot render exactly as kustomize would."""


# ---------------------------------------------------------------------------------------------------------------------
# Rendering: a subset of kustomize


KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches"}
PATCH_FIELDS = {"path", "patch", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace", "labelSelector"}


def render(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k folder` would apply, for kustomizations made of resources and JSON 6902
    patches. Any other kustomize feature raises RenderError: the test must not pass on output kustomize would not
    produce."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - KUSTOMIZATION_FIELDS
    if unsupported:
        raise RenderError(f"{folder}: kustomization fields {sorted(unsupported)} are not supported by this renderer")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources") or []:
        path = (folder / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for i, patch in enumerate(kustomization.get("patches") or []):
        where = f"{folder}: patches[{i}]"
        if set(patch) - PATCH_FIELDS or ("path" in patch) == ("patch" in patch) or not patch.get("target"):
            raise RenderError(f"{where}: needs a target and exactly one of path/patch (nothing else is supported)")
        text = patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise RenderError(f"{where}: only JSON 6902 patches (a list of operations) are supported; strategic "
                              "merge on custom resources replaces whole lists")
        targets = [obj for obj in objects if _selected(obj, patch["target"], where)]
        if not targets:
            raise RenderError(f"{where}: target {patch['target']} matches no resource")
        for obj in targets:
            try:
                apply_json6902(obj, ops)
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise RenderError(f"{where} on {obj['kind']}/{obj['metadata']['name']}: {e}") from None
    ids = [(obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]) for obj in objects]
    if len(set(ids)) != len(ids):
        raise RenderError(f"{folder}: duplicate resources {sorted(i for i in ids if ids.count(i) > 1)}")
    return objects


def _selected(obj: dict[str, Any], target: dict[str, str], where: str) -> bool:
    """kustomize's patch target: every given field must match, as an anchored regular expression."""
    group, _, version = obj["apiVersion"].rpartition("/")
    meta = obj["metadata"]
    fields = {"group": group, "version": version, "kind": obj["kind"], "name": meta["name"],
              "namespace": meta.get("namespace", "")}
    for key, value in target.items():
        if key not in TARGET_FIELDS:
            raise RenderError(f"{where}: target field {key!r} is not supported")
        if key == "labelSelector":
            for term in value.split(","):
                label, sep, wanted = term.partition("=")
                if not sep or label.endswith("!") or wanted.startswith("="):
                    raise RenderError(f"{where}: only label=value selectors are supported, not {term!r}")
                if meta.get("labels", {}).get(label.strip()) != wanted.strip():
                    return False
        elif not re.fullmatch(value, fields[key]):
            return False
    return True


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _index(token: str, size: int, *, append: bool = False) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]*", token) or int(token) > size or (int(token) == size and not append):
        raise IndexError(f"list index {token!r} out of range (length {size})")
    return int(token)


def _parent(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens[:-1]:
        node = node[_index(token, len(node))] if isinstance(node, list) else node[token]
    return node


def apply_json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add, remove, replace and test on ``doc``, in place (move and copy are refused)."""
    for op in ops:
        tokens = _pointer(op["path"])
        parent, last = _parent(doc, tokens), tokens[-1]
        kind = op["op"]
        if kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                else:
                    parent.insert(_index(last, len(parent), append=True), value)
            else:
                parent[last] = value
        elif kind in ("remove", "replace", "test"):
            key = _index(last, len(parent)) if isinstance(parent, list) else last
            if not isinstance(parent, list) and key not in parent:
                raise KeyError(f"{op['path']}: no such field")
            if kind == "remove":
                del parent[key]
            elif kind == "replace":
                parent[key] = copy.deepcopy(op["value"])
            elif parent[key] != op["value"]:
                raise ValueError(f"test failed: {op['path']} is {parent[key]!r}, not {op['value']!r}")
        else:
            raise ValueError(f"operation {kind!r} is not supported")


def kustomizations() -> list[str]:
    """Every kustomization under k8s/, relative to it."""
    return sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))


@functools.cache
def _rendered(name: str) -> str:
    return json.dumps(render(K8S / name))


def rendered(name: str) -> list[dict[str, Any]]:
    """A fresh copy of the rendered kustomization (tests mutate what they get)."""
    return json.loads(_rendered(name))


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


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A structural CRD schema made strict for jsonschema: an object's undeclared fields are errors (the API server
    would prune them, and `kubectl --validate=strict` refuses them), `nullable` allows null, and int-or-string
    allows both types."""
    s = dict(schema)
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    for key in ("properties", "patternProperties"):
        if key in s:
            s[key] = {name: strict_schema(sub) for name, sub in s[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = strict_schema(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict_schema(sub) for sub in s[key]]
    if s.get("type") == "object" and "additionalProperties" not in s and not s.get(
            "x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    return s


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: the items of a `map` list are unique by their keys, those of a `set` list unique."""
    if not validator.is_type(instance, "array"):
        return
    seen: set[str] = set()
    for item in instance:
        if list_type == "map":
            key = json.dumps([item.get(k) for k in schema.get("x-kubernetes-list-map-keys", [])])
        elif list_type == "set":
            key = json.dumps(item, sort_keys=True)
        else:
            continue
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate item {key} in a list of type {list_type}")
        seen.add(key)


def _cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations are CEL rules the API server evaluates. This test cannot evaluate them, so a field
    guarded by one is refused rather than waved through."""
    yield jsonschema.ValidationError(f"sets a field with CEL rules this test cannot evaluate: {[r['rule'] for r in rules]}")


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
Validator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules}
)


@functools.cache
def _crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → the served version's raw openAPIV3Schema, for every CRD file in CRD_DIR."""
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
    schema = strict_schema(raw)
    schema["properties"] = {**schema["properties"], "metadata": OBJECT_META}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return Validator(schema, format_checker=FORMATS)


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


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, args = (pending + line).partition(" ")
        out.append((instruction.upper(), args.strip()))
        pending = ""
    return out


def dockerfile_base() -> dict[str, str]:
    froms = [args for instr, args in dockerfile() if instr == "FROM"]
    assert len(froms) == 1, f"one build stage expected, got FROM {froms}"
    match = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>gpu|cu\d+)", froms[0])
    assert match, f"FROM {froms[0]!r} is not a pinned Ray GPU image (rayproject/ray:<x.y.z>-py3XX-gpu)"
    return match.groupdict()


def dockerfile_workdir() -> str:
    workdirs = [args for instr, args in dockerfile() if instr == "WORKDIR"]
    assert workdirs, "the Dockerfile sets no WORKDIR"
    return workdirs[-1]


# ---------------------------------------------------------------------------------------------------------------------
# The checks: each returns the problems it found (an empty list when the manifests are right)


def version_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for label, spec in cluster_specs(objects):
        if spec.get("rayVersion") != ray_version():
            problems.append(f"{label}: rayVersion {spec.get('rayVersion')!r}, installed ray is {ray_version()}")
    found = sorted(images(objects))
    if len(found) != 1 or found[0].rpartition(":")[2] != image_tag():
        problems.append(f"images {found}: every container must run one image tagged {image_tag()}")
    return problems


def agreement_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every copy of the cluster spec has the same head, auth and worker pods (replica counts may differ)."""
    problems = []
    specs = cluster_specs(objects)
    first_label, first = specs[0]
    workers = {g["groupName"]: g for g in first.get("workerGroupSpecs", [])}
    for label, spec in specs[1:]:
        for key in ("headGroupSpec", "authOptions"):
            if spec.get(key) != first.get(key):
                problems.append(f"{label}: {key} differs from {first_label}'s")
        for group in spec.get("workerGroupSpecs", []):
            same = workers.get(group["groupName"])
            if same is not None and (group["template"], group.get("rayStartParams")) != (
                    same["template"], same.get("rayStartParams")):
                problems.append(f"{label}: worker group {group['groupName']} differs from {first_label}'s")
    return problems


def pod_problems(objects: list[dict[str, Any]], uses_gpu: bool) -> list[str]:
    problems = []
    for label, spec in cluster_specs(objects):
        for name, group in pod_groups(spec):
            where = f"{label} {name}"
            pod = group["template"]["spec"]
            container = ray_container(group)
            res = container.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(kind, {})):
                    problems.append(f"{where}: {kind} need cpu and memory")
            if GPU in res.get("requests", {}) and res["requests"][GPU] != res.get("limits", {}).get(GPU):
                problems.append(f"{where}: {GPU} requests must equal its limits")
            gpus = quantity(res.get("limits", {}).get(GPU, 0))
            tolerates = GPU_TOLERATION in pod.get("tolerations", [])
            if name == "head":
                if gpus or group.get("rayStartParams", {}).get("num-gpus") != "0":
                    problems.append(f"{where}: the head must be CPU-only with rayStartParams num-gpus '0'")
            elif uses_gpu and (gpus < 1 or GPU not in res.get("requests", {}) or not tolerates):
                problems.append(f"{where}: a GPU worker group must request and limit {GPU} >= 1 and tolerate "
                                f"{GPU_TOLERATION}")
            elif not uses_gpu and (gpus or tolerates):
                problems.append(f"{where}: a CPU-only cluster must neither request nor tolerate {GPU}")
            problems += _shm_problems(where, group, pod, container)
        if uses_gpu and not capacity(spec)["gpus"]:
            problems.append(f"{label}: no GPU worker group")
    if not uses_gpu and GPU in json.dumps(objects):
        problems.append(f"{GPU} appears in a CPU-only kustomization")
    return problems


def _shm_problems(where: str, group: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
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


def parse_entrypoint(entrypoint: str) -> tuple[str, argparse.Namespace]:
    """(script, parsed arguments) of ``python jobs/<x>.py --config FILE overrides...``, with the project's parser.

    KubeRay puts the entrypoint into a shell command line (`ray job submit ... -- <entrypoint> ;`), so it must be
    one plain command: `&&`, `;`, pipes or redirections would run in the submitter pod, not in the job."""
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    operators = [t for t in tokens if t and set(t) <= set("();<>|&")]
    if operators:
        raise ValueError(f"entrypoint has shell operators {operators}: it must be one command")
    if len(tokens) < 2 or tokens[0] != "python" or not re.fullmatch(r"jobs/\w+\.py", tokens[1]):
        raise ValueError(f"entrypoint must be `python jobs/<job>.py ...`, got {tokens[:2]}")
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_args(parser)
    try:
        args = parser.parse_args(tokens[2:])
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"entrypoint arguments do not parse: {e}") from None
    return tokens[1], args


def load_job(obj: dict[str, Any]) -> tuple[str, argparse.Namespace, VDRConfig]:
    """(script stem, parsed arguments, resolved config) of a RayJob's entrypoint (cached: do not modify them)."""
    return _load_entrypoint(obj["spec"]["entrypoint"])


@functools.cache
def _load_entrypoint(entrypoint: str) -> tuple[str, argparse.Namespace, VDRConfig]:
    script, args = parse_entrypoint(entrypoint)
    if not (ROOT / script).is_file():
        raise ValueError(f"{script} does not exist")
    if not args.config or not (ROOT / args.config).is_file():
        raise ValueError(f"--config {args.config!r} does not exist")
    args.config = str(ROOT / args.config)
    return Path(script).stem, args, config_from_args(args)


def job_problems(objects: list[dict[str, Any]], uses_gpu: bool, flash_attn_optional: bool) -> list[str]:
    problems: list[str] = []
    jobs = [obj for obj in objects if obj["kind"] == "RayJob"]
    configs: dict[str, VDRConfig] = {}
    for obj in jobs:
        name, spec = obj["metadata"]["name"], obj["spec"]
        where = f"RayJob/{name}"
        if spec.get("submissionMode") != "K8sJobMode" or spec.get("shutdownAfterJobFinishes") is not True:
            problems.append(f"{where}: needs submissionMode K8sJobMode and shutdownAfterJobFinishes true")
        if "ttlSecondsAfterFinished" not in spec or "rayClusterSpec" not in spec or "clusterSelector" in spec:
            problems.append(f"{where}: needs ttlSecondsAfterFinished and a rayClusterSpec of its own")
        problems += _runtime_env_problems(where, spec.get("runtimeEnvYAML", ""))
        try:
            script, args, cfg = load_job(obj)
        except (ValueError, ConfigError) as e:
            problems.append(f"{where}: {e}")
            continue
        if name != "ray-vdr-" + script.replace("_", "-"):
            problems.append(f"{where}: runs jobs/{script}.py, which belongs to ray-vdr-{script.replace('_', '-')}")
        configs[script] = cfg
        overridden = {o.partition("=")[0] for o in args.overrides}
        needed = {"run.storage_path", "index.output"} | NEEDED_OVERRIDES.get(script, set())
        if needed - overridden:
            problems.append(f"{where}: set {sorted(needed - overridden)} in the entrypoint, so that bucket names "
                            "and the endpoint's address live in k8s/ only")
        problems += [f"{where}: {p}" for p in _storage_problems(cfg)]
        if script == "promote" and cfg.serve.model is not None:
            problems.append(f"{where}: serve.model {cfg.serve.model!r} pins the query embedder, and promotion "
                            "refuses it: leave it null")
        if cfg.scaling.use_gpu != uses_gpu:
            problems.append(f"{where}: scaling.use_gpu is {cfg.scaling.use_gpu} on a cluster with"
                            f"{'' if uses_gpu else 'out'} GPUs")
        if flash_attn_optional and "flash_attention_2" in (cfg.model.attn_implementation,
                                                           cfg.reranker.model.attn_implementation):
            problems.append(f"{where}: attn_implementation flash_attention_2 fails in an image built with "
                            "FLASH_ATTN=0; use auto")
        problems += [f"{where}: {p}" for p in _fit_problems(script, cfg, capacity(spec["rayClusterSpec"]))]
    if sorted(configs) != sorted(JOBS) or len(jobs) != len(JOBS):
        problems.append(f"RayJobs run {sorted(configs)}, expected one each of {sorted(JOBS)}")
    shared = [(c, _shared_settings(c)) for c in configs.values()]
    if any(settings != shared[0][1] for _, settings in shared):
        problems.append(f"the jobs disagree on their run, bucket or models: {[s for _, s in shared]}")
    return problems


def _runtime_env_problems(where: str, text: str) -> list[str]:
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{where}: runtimeEnvYAML does not parse: {e}"]
    if not isinstance(env, dict):
        return [f"{where}: runtimeEnvYAML must be a mapping"]
    problems = []
    working_dir = env.get("working_dir")
    if working_dir != dockerfile_workdir() and not (str(working_dir).startswith(REMOTE) and working_dir.endswith(".zip")):
        problems.append(f"{where}: working_dir {working_dir!r} must be the image's {dockerfile_workdir()} or a "
                        "remote .zip")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (env.get("env_vars") or {}).items()):
        problems.append(f"{where}: runtimeEnvYAML env_vars values must be strings (Ray refuses others)")
    return problems


def _storage_problems(cfg: VDRConfig) -> list[str]:
    """Pods share no filesystem: everything one job writes for another must be in a bucket."""
    uris = {"run.storage_path": cfg.run.storage_path, "index.output": cfg.index.output,
            "mine.output": cfg.mine.output, "evaluate.output": cfg.evaluate.output, "serve.index": cfg.serve.index,
            "serve.live": cfg.serve.live, "promote.model": cfg.promote.model, "promote.output": cfg.promote.output}
    uris |= {f"index.sources[{i}]": s for i, s in enumerate(cfg.index.sources)}
    for name, source in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval),
                         ("reranker.data", cfg.reranker.data), ("mine.queries", cfg.mine.queries)):
        if source is not None and source.format != "hf_hub":
            uris[f"{name}.uri"] = source.uri
    return [f"{k} {v!r} is not an s3:// or gs:// URI" for k, v in uris.items() if v is not None
            and not v.startswith(REMOTE)]


def _shared_settings(cfg: VDRConfig) -> dict[str, Any]:
    """What every job of a pipeline must see alike (training recipes and worker counts may differ per job)."""
    return {"run": cfg.run.model_dump(), "index.output": cfg.index.output, "data": cfg.data.model_dump(),
            "model": cfg.model.model_dump(), "reranker.model": cfg.reranker.model.model_dump(),
            "reranker.run_name": cfg.reranker.run_name, "output": cfg.output.model_dump()}


def _fit_problems(script: str, cfg: VDRConfig, cap: dict[str, float]) -> list[str]:
    """The job's workers or actors fit the cluster it brings (otherwise it waits for resources forever)."""
    if script in ("train_embedder", "train_reranker"):
        scaling = (cfg.reranker.scaling or cfg.scaling) if script == "train_reranker" else cfg.scaling
        per = scaling.resources_per_worker or {"CPU": 1, "GPU": 1 if scaling.use_gpu else 0}
        n, gpus, cpus = scaling.num_workers, per.get("GPU", 0), per.get("CPU", 1)
        what = f"{n} Train workers x {per}"
    elif script == "promote":  # re-embeds the corpus (the embedding job's actors), then one evaluation task
        return (_fit_problems("embed_corpus", cfg, cap)
                + _fits(1, 1 if cfg.scaling.use_gpu else 0, cfg.promote.eval_cpus, "1 evaluation task", cap))
    elif script in ("embed_corpus", "mine_negatives"):
        section = cfg.index if script == "embed_corpus" else cfg.mine
        n, gpus, cpus = section.actors, 1 if cfg.scaling.use_gpu else 0, section.cpus_per_actor
        what = f"{n} actors x ({cpus} CPU, {gpus} GPU)"
    else:
        n, gpus, cpus, what = 1, 1 if cfg.scaling.use_gpu else 0, 1, "1 evaluation task"
    return _fits(n, gpus, cpus, what, cap)


def _fits(n: int, gpus: float, cpus: float, what: str, cap: dict[str, float]) -> list[str]:
    fits = (n * gpus <= cap["gpus"] and cpus <= cap["gpu_pod_cpus"]) if gpus else n * cpus <= cap["cpus"]
    return [] if fits else [f"{what} do not fit the cluster ({cap})"]


def service_problems(objects: list[dict[str, Any]], uses_gpu: bool) -> list[str]:
    services = [obj for obj in objects if obj["kind"] == "RayService"]
    if len(services) != 1:
        return [f"expected one RayService, got {len(services)}"]
    service = services[0]
    reference = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    try:
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
    except yaml.YAMLError as e:
        return [f"serveConfigV2 does not parse: {e}"]
    if not isinstance(config, dict):
        return ["serveConfigV2 must be a mapping"]
    problems = []
    for key in sorted(set(reference) | set(config)):
        if key != "applications" and config.get(key) != reference.get(key):
            problems.append(f"serveConfigV2 {key}: {config.get(key)!r}, serving/config.yaml has {reference.get(key)!r}")
    apps, ref_apps = config.get("applications") or [], reference["applications"]
    if [a.get("name") for a in apps] != [a["name"] for a in ref_apps]:
        return [*problems, f"applications {[a.get('name') for a in apps]} differ from serving/config.yaml's"]
    spec = service["spec"]["rayClusterConfig"]
    serve_port = {p.get("name"): p["containerPort"] for p in ray_container(spec["headGroupSpec"]).get("ports", [])}
    if serve_port.get("serve") != config["http_options"]["port"]:
        problems.append(f"the head's port named serve {serve_port.get('serve')} is not http_options.port")
    jobs = {}
    for obj in objects:
        if obj["kind"] == "RayJob":
            with contextlib.suppress(ValueError, ConfigError):  # job_problems reports it
                jobs[obj["metadata"]["name"]] = load_job(obj)[2]
    for app, ref in zip(apps, ref_apps, strict=True):
        where = f"application {app['name']}"
        for key in sorted(set(app) | set(ref)):
            if key != "args" and app.get(key) != ref.get(key):
                problems.append(f"{where}: {key} {app.get(key)!r} differs from serving/config.yaml's {ref.get(key)!r}")
        if "working_dir" in (app.get("runtime_env") or {}) and not app["runtime_env"]["working_dir"].startswith(REMOTE):
            problems.append(f"{where}: Serve refuses a local working_dir")
        args = app.get("args") or {}
        try:
            cfg = ServeConfig.model_validate(args)
        except ValueError as e:
            problems.append(f"{where}: args are not a valid ServeConfig: {e}")
            continue
        mine, theirs = _flatten(args), _flatten(ref["args"])
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, "<unset>") != theirs.get(key, "<unset>") and not SERVE_ARGS_MAY_DIFFER.fullmatch(key):
                problems.append(f"{where}: args.{key} {mine.get(key, '<unset>')!r} differs from serving/config.yaml's "
                                f"{theirs.get(key, '<unset>')!r} (not a documented difference)")
        problems += [f"{where}: {p}" for p in _endpoint_problems(cfg, jobs, capacity(spec), uses_gpu)]
        problems += [f"{where}: {p}" for p in _promotion_problems(
            cfg, jobs.get("ray-vdr-promote"), service["metadata"]["name"], config["http_options"]["port"],
            app.get("route_prefix", "/"))]
    return problems


def _promotion_problems(cfg: ServeConfig, promote: VDRConfig | None, service: str, port: int,
                        route_prefix: str) -> list[str]:
    """The promote job switches this endpoint: it writes the live manifest the endpoint follows, starts from the
    index the endpoint serves before the first promotion, and confirms the switch at the endpoint's Service."""
    if cfg.live is not None and not cfg.live.startswith(REMOTE):
        return [f"live {cfg.live!r} must be null or a bucket URI (the promote job writes it from another cluster)"]
    if promote is None:  # job_problems reports the missing job
        return []
    problems = []
    if cfg.live is None or promote.serve.live != cfg.live:
        problems.append(f"live {cfg.live!r} is not the promote job's serve.live {promote.serve.live!r}: a "
                        "promotion would not switch this endpoint")
    if promote.serve.index != cfg.index:
        problems.append(f"the promote job's serve.index {promote.serve.index!r} is not the index {cfg.index!r} "
                        "served before the first promotion")
    # KubeRay's Service for the Serve proxies: <RayService name>-serve-svc, in the namespace of the job
    url = urlsplit(promote.promote.endpoint or "")
    host_ok = url.hostname is not None and re.fullmatch(rf"{re.escape(service)}-serve-svc(\.[a-z0-9.-]+)?",
                                                        url.hostname)
    if (url.scheme != "http" or not host_ok or url.port != port
            or url.path.rstrip("/") != route_prefix.rstrip("/")):
        problems.append(f"the promote job's promote.endpoint {promote.promote.endpoint!r} is not this endpoint "
                        f"(http://{service}-serve-svc:{port}{route_prefix})")
    return problems


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _endpoint_problems(cfg: ServeConfig, jobs: dict[str, VDRConfig], cap: dict[str, float], uses_gpu: bool) -> list[str]:
    problems = []
    embed = jobs.get("ray-vdr-embed-corpus")
    if cfg.index is None or embed is None or cfg.index != embed.index.output:
        problems.append(f"index {cfg.index!r} is not the embed-corpus job's index.output "
                        f"{embed.index.output if embed else None!r}")
    if cfg.model is not None and not cfg.model.startswith(REMOTE):
        problems.append(f"model {cfg.model!r} must be null (the index's) or a bucket URI")
    train = jobs.get("ray-vdr-train-reranker")
    if cfg.reranker is not None and train is not None:
        run_name = train.reranker.run_name or f"{train.run.name}-reranker"
        expected = "/".join([train.run.storage_path.rstrip("/"), run_name, "model"])
        if cfg.reranker != expected:
            problems.append(f"reranker {cfg.reranker!r} is not the train-reranker job's model {expected!r}")
    models = [cfg.embedder, *([cfg.rerank] if cfg.reranker else [])]
    if uses_gpu and any(d.num_gpus is None for d in models):
        problems.append("set num_gpus of the model deployments: build_app picks 0 when no GPU worker is up yet")
    # build_app's defaults: the model deployments take 1 GPU each on a cluster with GPUs, the others none
    gpus = sum(d.max_replicas * (d.num_gpus if d.num_gpus is not None else float(uses_gpu)) for d in models)
    gpus += sum(d.max_replicas * (d.num_gpus or 0.0) for d in (cfg.retriever, cfg.ingress))
    cpus = sum(d.max_replicas * d.num_cpus for d in (*models, cfg.retriever, cfg.ingress))
    if gpus > cap["gpus"] or cpus > cap["cpus"]:
        problems.append(f"at max_replicas the deployments need {gpus} GPUs and {cpus} CPUs; the cluster has {cap}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_every_kustomization_is_validated():
    assert kustomizations() == sorted(USES_GPU), "a kustomization under k8s/ is missing from USES_GPU (or gone)"


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_manifests_match_the_kuberay_crds(name):
    objects = rendered(name)
    assert {obj["kind"] for obj in objects} == {"RayCluster", "RayJob", "RayService"}
    errors = [f"{obj['kind']}/{obj['metadata']['name']}{e}" for obj in objects for e in schema_errors(obj)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_one_image_and_ray_version(name):
    problems = version_problems(rendered(name))
    assert not problems, "\n".join(problems)
    assert images(rendered(name)) == {image_name()}, "an overlay runs another image than the base"


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_every_copy_of_the_cluster_spec_agrees(name):
    problems = agreement_problems(rendered(name))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_pods_gpus_and_shared_memory(name):
    problems = pod_problems(rendered(name), USES_GPU[name])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_jobs_run_the_pipeline_with_valid_configs(name):
    problems = job_problems(rendered(name), USES_GPU[name], flash_attn_optional=True)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_rayservice_serves_the_serving_config(name):
    problems = service_problems(rendered(name), USES_GPU[name])
    assert not problems, "\n".join(problems)


def test_ray_version_is_pinned_everywhere():
    installed = ray_version()
    assert ray_requirement().specifier.contains(installed), f"installed ray {installed} is outside pyproject's pin"
    base = dockerfile_base()
    assert base["ray"] == installed, f"the Dockerfile's base has Ray {base['ray']}, installed is {installed}"
    py = Version(f"{base['py'][0]}.{base['py'][1:]}")
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(py), f"the image's Python {py} is too old"
    assert image_name().rpartition(":")[2] == image_tag() and f"ray{installed}" in image_tag()


def test_dockerfile_installs_the_repo_with_its_gpu_extra():
    instructions = dockerfile()
    workdir = dockerfile_workdir()
    assert workdir == "/app"
    copies = [args.split() for instr, args in instructions if instr == "COPY"]
    assert any(parts[-2:] in ([".", workdir], [".", "."]) for parts in copies), f"the repo is not copied to {workdir}"
    runs = " ".join(args for instr, args in instructions if instr == "RUN")
    assert re.search(r"pip install [^;&|]*\"?\.\[gpu\]\"?", runs), "no `pip install .[gpu]`"
    assert any(instr == "ARG" and args.startswith("FLASH_ATTN=") for instr, args in instructions)
    # Without flash-attn (FLASH_ATTN=0) the image installs the `gpu` extra's other requirements: keep both lists equal.
    branch = re.search(r"\belse\b(.*?)\bfi\b", runs.split(".[gpu]", 1)[1], re.S)
    assert branch, "no FLASH_ATTN=0 branch after the .[gpu] install"
    tokens = shlex.split(branch.group(1).replace(";", " "))
    installed = {str(Requirement(t)) for t in tokens[tokens.index("install") + 1:] if not t.startswith("-")
                 and t != "." and not t.startswith("/")}
    extra = {str(Requirement(r.split(";")[0])) for r in pyproject()["project"]["optional-dependencies"]["gpu"]}
    assert installed == {r for r in extra if not r.startswith("flash-attn")}


def test_dockerignore_keeps_what_the_image_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "negated patterns are not supported by this check"
    regexes = [re.compile(re.escape(p.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
                          .replace(r"\?", "[^/]")) for p in patterns]

    def excluded(rel: str) -> bool:  # Docker: a pattern matches a path or any folder above it, from the context root
        parts = rel.split("/")
        return any(r.fullmatch("/".join(parts[:i])) for r in regexes for i in range(1, len(parts) + 1))

    needed = ["pyproject.toml", "README.md", *(str(p.relative_to(ROOT)) for folder in ("ray_vdr", "serving", "jobs",
              "configs") for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)]
    assert not [f for f in needed if excluded(f)], "the .dockerignore leaves out files the image needs"
    for local in ("runs", "artifacts", "data", ".venv", "outputs", ".git"):
        assert excluded(f"{local}/x"), f"{local}/ should not go into the image"


def test_readme_documents_the_image_and_overlays():
    readme = (K8S / "README.md").read_text()
    assert image_name() in readme
    for name in USES_GPU:
        assert f"k8s/{name}" in readme


def test_vendored_crds_are_kuberays():
    names = sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    assert names == ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"]
    if not SHARED_CRD_DIR.is_dir() or "RAY_VDR_KUBERAY_CRDS" in os.environ:
        pytest.skip("RAY_VDR_KUBERAY_CRDS is set, or there is no ../shared/kuberay-crds to compare the copy with")
    for name in names:
        assert (CRD_DIR / name).read_bytes() == (SHARED_CRD_DIR / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------------------------------
# The checks can fail: broken manifests are caught


PROMOTE = "ray-vdr-promote"


def _job(objects, name="ray-vdr-train-embedder"):
    return next(o for o in objects if o["kind"] == "RayJob" and o["metadata"]["name"] == name)


def _rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


SCHEMA_BREAKS = {
    "misspelled spec field": (lambda o: _rename(o["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
                              "shutdownAfterJobFinish"),
    "misspelled container field": (
        lambda o: _rename(o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0],
                          "resources", "resource"), "resource"),
    "unknown metadata field": (lambda o: o["metadata"].update(label={"a": "b"}), "label"),
    "wrong type": (lambda o: o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas="two"), "two"),
    "missing required field": (lambda o: o["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"),
                               "groupName"),
    "bad quantity": (lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"].update(memory="16 GB"), "16 GB"),
    "int32 overflow": (lambda o: o["spec"].update(ttlSecondsAfterFinished=2**40), "int32"),
    "duplicate container": (lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"].append({"name": "ray-head", "image": "x"}), "duplicate"),
    "field guarded by CEL": (lambda o: o["spec"].update(managedBy="someone"), "CEL"),
    "bad name": (lambda o: o["metadata"].update(name="Ray_VDR"), "Ray_VDR"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKS))
def test_schema_validation_rejects_broken_manifests(case):
    obj = _job(rendered("base"))
    assert schema_errors(obj) == []
    mutate, expected = SCHEMA_BREAKS[case]
    mutate(obj)
    errors = schema_errors(obj)
    assert errors and expected in "\n".join(errors), errors


def _entrypoint(o, old, new):
    o["spec"]["entrypoint"] = o["spec"]["entrypoint"].replace(old, new)


def _promote_entrypoint(old, new):
    return lambda objs: _entrypoint(_job(objs, PROMOTE), old, new)


def _serve_args(objects, update):
    service = next(o for o in objects if o["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    update(config["applications"][0]["args"])
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)


CHECK_BREAKS = {
    "GPU worker without the toleration": (
        pod_problems, lambda objs: _job(objs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"].pop(
            "tolerations"), "tolerate"),
    "small /dev/shm": (
        pod_problems, lambda objs: _job(objs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "volumes"][0]["emptyDir"].update(sizeLimit="1Gi"), "/dev/shm"),
    "head drifted from the other copies": (
        agreement_problems, lambda objs: _job(objs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "containers"][0]["resources"]["limits"].update(memory="32Gi"), "headGroupSpec differs"),
    "other image": (
        version_problems, lambda objs: _job(objs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "containers"][0].update(image="rayproject/ray:2.60.0-py311-gpu"), "images"),
    "other rayVersion": (version_problems, lambda objs: _job(objs)["spec"]["rayClusterSpec"].update(rayVersion="2.59.0"),
                         "rayVersion"),
    "missing job script": (job_problems, lambda objs: _entrypoint(_job(objs), "train_embedder", "train_embeder"),
                           "does not exist"),
    "entrypoint of another job": (
        job_problems, lambda objs: _entrypoint(_job(objs), "jobs/train_embedder.py", "jobs/evaluate.py"),
        "belongs to"),
    "override typo": (job_problems, lambda objs: _entrypoint(_job(objs), "scaling.num_workers", "scaling.num_worker"),
                      "unknown field"),
    "chained commands": (job_problems, lambda objs: _entrypoint(_job(objs), " scaling.", " && python jobs/x.py scaling."),
                         "shell operators"),
    "more workers than GPUs": (job_problems, lambda objs: _entrypoint(_job(objs), "num_workers=1", "num_workers=2"),
                               "do not fit"),
    "local run storage": (job_problems, lambda objs: _entrypoint(_job(objs), "s3://YOUR-BUCKET/ray-vdr ", "./runs "),
                          "not an s3://"),
    "jobs writing to different buckets": (
        job_problems, lambda objs: _entrypoint(_job(objs, "ray-vdr-evaluate"), "s3://YOUR-BUCKET", "s3://OTHER"),
        "disagree"),
    "runtime env with a number": (
        job_problems, lambda objs: _job(objs)["spec"].update(runtimeEnvYAML="working_dir: /app\nenv_vars: {A: 1}\n"),
        "strings"),
    "serve limit changed": (service_problems, lambda objs: _serve_args(objs, lambda a: a["limits"].update(max_top_k=50)),
                            "limits.max_top_k"),
    "serve index not the embedding job's": (
        service_problems, lambda objs: _serve_args(objs, lambda a: a.update(index="s3://YOUR-BUCKET/elsewhere")),
        "embed-corpus"),
    "invalid serve args": (service_problems, lambda objs: _serve_args(objs, lambda a: a.update(dtype="int4")),
                           "ServeConfig"),
    "serve needs more GPUs than the cluster has": (
        service_problems, lambda objs: _serve_args(objs, lambda a: a["embedder"].update(max_replicas=16)),
        "max_replicas"),
    "promote job without serve.live": (
        job_problems, _promote_entrypoint(" serve.live=s3://YOUR-BUCKET/ray-vdr/live.json", ""), "['serve.live']"),
    "promote job writing a local live manifest": (
        job_problems, _promote_entrypoint("serve.live=s3://YOUR-BUCKET/ray-vdr/", "serve.live=./"),
        "serve.live './live.json' is not an s3://"),
    "promote job's model not the others'": (
        job_problems, _promote_entrypoint(" index.actors", " model.dtype=float32 index.actors"), "disagree"),
    "promote job pinning the query embedder": (
        job_problems, _promote_entrypoint(" index.actors", " serve.model=s3://YOUR-BUCKET/m index.actors"),
        "serve.model"),
    "promote job's re-embedding does not fit": (
        job_problems, _promote_entrypoint("index.actors=1", "index.actors=2"), "do not fit"),
    "promote job writing another manifest than the endpoint follows": (
        service_problems, _promote_entrypoint("ray-vdr/live.json", "ray-vdr/live-2.json"), "serve.live"),
    "endpoint not following the live manifest": (
        service_problems, lambda objs: _serve_args(objs, lambda a: a.pop("live")), "serve.live"),
    "promote job starting from another index": (
        service_problems, _promote_entrypoint("serve.index=s3://YOUR-BUCKET/ray-vdr/index",
                                              "serve.index=s3://YOUR-BUCKET/ray-vdr/index-2"), "serve.index"),
    "promote job waiting on another endpoint": (
        service_problems, _promote_entrypoint("ray-vdr-serve-svc", "ray-vdr-head-svc"), "promote.endpoint"),
}


@pytest.mark.parametrize("case", sorted(CHECK_BREAKS))
def test_checks_catch_broken_manifests(case):
    check, mutate, expected = CHECK_BREAKS[case]
    run = {pod_problems: lambda o: pod_problems(o, True), job_problems: lambda o: job_problems(o, True, True),
           service_problems: lambda o: service_problems(o, True)}.get(check, check)
    objects = rendered("base")
    assert run(objects) == []
    mutate(objects)
    problems = run(objects)
    assert problems and expected in "\n".join(problems), problems


def test_cpu_kustomization_must_not_ask_for_gpus():
    objects = rendered("overlays/dev-cpu")
    assert pod_problems(objects, False) == []
    job = _job(objects)
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["tolerations"] = [GPU_TOLERATION]
    assert any(GPU in p for p in pod_problems(objects, False))


def _overlay(tmp_path, kustomization: dict[str, Any]) -> Path:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [str(K8S / "base")], **kustomization}))
    return tmp_path


RENDER_BREAKS = {
    "unsupported kustomize field": {"images": [{"name": "x", "newTag": "y"}]},
    "strategic merge patch": {"patches": [{"target": {"kind": "RayCluster"}, "patch": "spec: {rayVersion: '1'}"}]},
    "patch without a match": {"patches": [{"target": {"kind": "RayJob", "name": "nope"},
                                           "patch": "[{op: remove, path: /spec/suspend}]"}]},
    "path that does not exist": {"patches": [{"target": {"kind": "RayCluster"},
                                              "patch": "[{op: replace, path: /spec/workerGroupSpecs/3/replicas, "
                                                       "value: 2}]"}]},
    "failed test operation": {"patches": [{"target": {"kind": "RayCluster"},
                                           "patch": "[{op: test, path: /spec/workerGroupSpecs/0/groupName, "
                                                    "value: cpu}]"}]},
    "unsupported operation": {"patches": [{"target": {"kind": "RayCluster"},
                                           "patch": "[{op: copy, from: /spec/rayVersion, path: /spec/x}]"}]},
}


@pytest.mark.parametrize("case", sorted(RENDER_BREAKS))
def test_renderer_refuses_what_it_cannot_render_exactly(tmp_path, case):
    with pytest.raises(RenderError):
        render(_overlay(tmp_path, RENDER_BREAKS[case]))


def test_renderer_applies_json6902_like_kustomize(tmp_path):
    ops = [{"op": "add", "path": "/metadata/labels/team", "value": "search"},
           {"op": "add", "path": "/spec/workerGroupSpecs/-", "value": {"groupName": "extra"}},
           {"op": "add", "path": "/spec/workerGroupSpecs/0", "value": {"groupName": "first"}},
           {"op": "replace", "path": "/spec/headGroupSpec/rayStartParams/num-cpus", "value": "1"},
           {"op": "remove", "path": "/spec/workerGroupSpecs/1"}]
    objects = render(_overlay(tmp_path, {"patches": [
        {"target": {"kind": "RayCluster", "name": "ray-v.*"}, "patch": yaml.safe_dump(ops)},
        {"target": {"labelSelector": "app.kubernetes.io/component=evaluate"},
         "patch": "[{op: replace, path: /spec/ttlSecondsAfterFinished, value: 5}]"},
    ]}))
    cluster = next(o for o in objects if o["kind"] == "RayCluster")
    assert cluster["metadata"]["labels"]["team"] == "search"
    assert [g["groupName"] for g in cluster["spec"]["workerGroupSpecs"]] == ["first", "extra"]
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "1"
    assert [o["spec"]["ttlSecondsAfterFinished"] for o in objects if o["kind"] == "RayJob"].count(5) == 1
