"""The k8s checks can fail: manifests broken on purpose (JSON patches with jsonpatch, or edits of a string field) are
caught by the schema, by each check, and by kustomize."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.k8s.checks import (
    agreement_problems,
    job_problems,
    pod_problems,
    service_problems,
    version_problems,
)
from tests.k8s.manifests import (
    GPU,
    GPU_TOLERATION,
    K8S,
    idle_patches,
    render,
    rendered,
    schema_errors,
)

PROMOTE = "ray-vdr-promote"
MAKE_DATA = "ray-vdr-make-training-data"
WORKER = "/spec/rayClusterSpec/workerGroupSpecs/0"
HEAD_POD = "/spec/rayClusterSpec/headGroupSpec/template/spec"
HEAD = f"{HEAD_POD}/containers/0"


def _job(objects, name="ray-vdr-train-embedder"):
    return next(o for o in objects if o["kind"] == "RayJob" and o["metadata"]["name"] == name)


SCHEMA_BREAKS = {  # JSON patches of the train-embedder RayJob, and what its schema errors must name
    "misspelled spec field": ([{"op": "move", "from": "/spec/shutdownAfterJobFinishes",
                                "path": "/spec/shutdownAfterJobFinish"}], "shutdownAfterJobFinish"),
    "misspelled container field": ([{"op": "move", "from": f"{WORKER}/template/spec/containers/0/resources",
                                     "path": f"{WORKER}/template/spec/containers/0/resource"}], "resource"),
    "unknown metadata field": ([{"op": "add", "path": "/metadata/label", "value": {"a": "b"}}], "label"),
    "wrong type": ([{"op": "replace", "path": f"{WORKER}/replicas", "value": "two"}], "two"),
    "missing required field": ([{"op": "remove", "path": f"{WORKER}/groupName"}], "groupName"),
    "bad quantity": ([{"op": "replace", "path": f"{HEAD}/resources/limits/memory", "value": "16 GB"}], "16 GB"),
    "int32 overflow": ([{"op": "replace", "path": "/spec/ttlSecondsAfterFinished", "value": 2**40}], "int32"),
    "duplicate container": ([{"op": "add", "path": f"{HEAD_POD}/containers/-",
                              "value": {"name": "ray-head", "image": "x"}}], "duplicate"),
    "field guarded by CEL": ([{"op": "add", "path": "/spec/managedBy", "value": "someone"}], "CEL"),
    "bad name": ([{"op": "replace", "path": "/metadata/name", "value": "Ray_VDR"}], "Ray_VDR"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKS))
def test_schema_validation_rejects_broken_manifests(case):
    obj = _job(rendered("base"))
    assert schema_errors(obj) == []
    ops, expected = SCHEMA_BREAKS[case]
    errors = schema_errors(jsonpatch.apply_patch(obj, ops))
    assert errors and expected in "\n".join(errors), errors


def _patch(ops, name="ray-vdr-train-embedder"):
    """A mutation of the rendered objects: the JSON patch ``ops`` applied to the RayJob ``name``."""
    return lambda objs: jsonpatch.apply_patch(_job(objs, name), ops, in_place=True)


def _entrypoint(old, new, name="ray-vdr-train-embedder"):
    def mutate(objs):
        spec = _job(objs, name)["spec"]
        spec["entrypoint"] = spec["entrypoint"].replace(old, new)
    return mutate


def _promote_entrypoint(old, new):
    return _entrypoint(old, new, PROMOTE)


def _serve_args(ops):
    """A mutation of the rendered objects: the JSON patch ``ops`` applied to the args of the RayService's application
    (serveConfigV2 is a YAML string)."""
    def mutate(objs):
        spec = next(o for o in objs if o["kind"] == "RayService")["spec"]
        config = yaml.safe_load(spec["serveConfigV2"])
        jsonpatch.apply_patch(config["applications"][0]["args"], ops, in_place=True)
        spec["serveConfigV2"] = yaml.safe_dump(config)
    return mutate


CHECK_BREAKS = {
    "GPU worker without the toleration": (
        pod_problems, _patch([{"op": "remove", "path": f"{WORKER}/template/spec/tolerations"}]), "tolerate"),
    "small /dev/shm": (
        pod_problems, _patch([{"op": "replace", "path": f"{HEAD_POD}/volumes/0/emptyDir/sizeLimit", "value": "1Gi"}]),
        "/dev/shm"),
    "head drifted from the other copies": (
        agreement_problems, _patch([{"op": "replace", "path": f"{HEAD}/resources/limits/memory", "value": "32Gi"}]),
        "headGroupSpec differs"),
    "other image": (
        version_problems, _patch([{"op": "replace", "path": f"{HEAD}/image",
                                   "value": "rayproject/ray:2.60.0-py311-gpu"}]), "images"),
    "other rayVersion": (
        version_problems, _patch([{"op": "replace", "path": "/spec/rayClusterSpec/rayVersion", "value": "2.59.0"}]),
        "rayVersion"),
    "missing job script": (job_problems, _entrypoint("train_embedder", "train_embeder"), "does not exist"),
    "entrypoint of another job": (
        job_problems, _entrypoint("jobs/train_embedder.py", "jobs/evaluate.py"), "belongs to"),
    "override typo": (job_problems, _entrypoint("scaling.num_workers", "scaling.num_worker"), "unknown field"),
    "chained commands": (job_problems, _entrypoint(" scaling.", " && python jobs/x.py scaling."), "shell operators"),
    "more workers than GPUs": (job_problems, _entrypoint("num_workers=1", "num_workers=2"), "do not fit"),
    "local run storage": (job_problems, _entrypoint("s3://YOUR-BUCKET/ray-vdr ", "./runs "), "not an s3://"),
    "jobs writing to different buckets": (
        job_problems, _entrypoint("s3://YOUR-BUCKET", "s3://OTHER", "ray-vdr-evaluate"), "disagree"),
    "runtime env with a number": (
        job_problems, _patch([{"op": "replace", "path": "/spec/runtimeEnvYAML",
                               "value": "working_dir: /app\nenv_vars: {A: 1}\n"}]), "strings"),
    "serve limit changed": (
        service_problems, _serve_args([{"op": "replace", "path": "/limits/max_top_k", "value": 50}]),
        "limits.max_top_k"),
    "serve index not the embedding job's": (
        service_problems, _serve_args([{"op": "replace", "path": "/index", "value": "s3://YOUR-BUCKET/elsewhere"}]),
        "embed-corpus"),
    "invalid serve args": (
        service_problems, _serve_args([{"op": "replace", "path": "/dtype", "value": "int4"}]), "ServeConfig"),
    "serve needs more GPUs than the cluster has": (
        service_problems, _serve_args([{"op": "replace", "path": "/embedder/max_replicas", "value": 16}]),
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
    "training data written to a local folder": (
        job_problems, _entrypoint("queries.output=s3://YOUR-BUCKET/ray-vdr/", "queries.output=./", MAKE_DATA),
        "training-data' is not an s3://"),
    "training-data job without its documents": (
        job_problems, _entrypoint(" 'queries.sources=[s3://YOUR-BUCKET/documents]'", "", MAKE_DATA),
        "['queries.sources']"),
    "more VLM replicas than GPUs": (
        job_problems, _entrypoint("queries.vlm.replicas=1", "queries.vlm.replicas=2", MAKE_DATA), "VLM replicas"),
    "endpoint not following the live manifest": (
        service_problems, _serve_args([{"op": "remove", "path": "/live"}]), "serve.live"),
    "promote job starting from another index": (
        service_problems, _promote_entrypoint("serve.index=s3://YOUR-BUCKET/ray-vdr/index",
                                              "serve.index=s3://YOUR-BUCKET/ray-vdr/index-2"), "serve.index"),
    "endpoint without API keys": (
        service_problems, _serve_args([{"op": "remove", "path": "/auth"}]), "serve.auth"),
    "endpoint keys not from a Secret": (
        service_problems, lambda objs: jsonpatch.apply_patch(
            next(o for o in objs if o["kind"] == "RayService"),
            [{"op": "remove", "path": "/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0/env"}],
            in_place=True), "RAY_VDR_API_KEYS"),
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
    _patch([{"op": "add", "path": f"{HEAD_POD}/tolerations", "value": [GPU_TOLERATION]}])(objects)
    assert any(GPU in p for p in pod_problems(objects, False))


def _overlay(tmp_path: Path, patch: dict[str, Any]) -> Path:
    """A kustomization in tmp_path: k8s/base with one more patch (its operations given as a list)."""
    base = os.path.relpath(K8S / "base", tmp_path)  # kustomize refuses absolute paths in resources
    patch = {**patch, "patch": yaml.safe_dump(patch["patch"])}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [base], "patches": [patch]}))
    return tmp_path


KUSTOMIZE_REFUSES = {  # a patch kustomize cannot apply, and a word of its message
    "failed test operation": (
        {"target": {"kind": "RayCluster"},
         "patch": [{"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "cpu"}]}, "test failed"),
    "path that does not exist": (
        {"target": {"kind": "RayCluster"},
         "patch": [{"op": "replace", "path": "/spec/workerGroupSpecs/3/replicas", "value": 2}]}, "missing"),
    "unknown operation": (
        {"target": {"kind": "RayJob"}, "patch": [{"op": "frobnicate", "path": "/spec/suspend"}]}, "frobnicate"),
}


@pytest.mark.parametrize("case", sorted(KUSTOMIZE_REFUSES))
def test_a_kustomization_kustomize_refuses_fails_with_its_message(tmp_path, case):
    patch, message = KUSTOMIZE_REFUSES[case]
    with pytest.raises(RuntimeError, match=message):
        render(_overlay(tmp_path, patch))


def test_a_patch_that_matches_nothing_is_caught(tmp_path):
    folder = _overlay(tmp_path, {"target": {"kind": "RayJob", "name": "ray-vdr-train-embeder"},
                                 "patch": [{"op": "replace", "path": "/spec/ttlSecondsAfterFinished", "value": 5}]})
    assert render(folder) == rendered("base")  # kustomize itself does not mind
    assert idle_patches(folder) == ["patches[0] (target {'kind': 'RayJob', 'name': 'ray-vdr-train-embeder'}) "
                                    "changes nothing"]


def test_shard_groups_must_be_placeable_and_agree_with_the_index():
    """overlays/sharded-index: a shard group whose Ray resource no worker group offers would never get a replica, and
    a retriever count other than the index's shards would be refused by the retrievers."""
    objects = rendered("overlays/sharded-index")
    assert service_problems(objects, True) == []
    _serve_args([{"op": "replace", "path": "/retriever/shard_resources/1", "value": {"index_c": 1}}])(objects)
    assert "4.0 index_c at max_replicas; the worker groups offer 0.0" in "\n".join(service_problems(objects, True))
    objects = rendered("overlays/sharded-index")
    _serve_args([{"op": "replace", "path": "/retriever/shards", "value": 3}])(objects)
    assert "index.shards 4" in "\n".join(service_problems(objects, True))
