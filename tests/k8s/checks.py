"""The k8s checks: each returns the problems it finds in rendered objects (an empty list when manifests are right)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ray_vdr.cli import add_config_args, config_from_args
from ray_vdr.config import ConfigError, ServeConfig, VDRConfig
from tests.k8s.manifests import (
    GPU,
    GPU_TOLERATION,
    JOBS,
    NEEDED_OVERRIDES,
    REMOTE,
    ROOT,
    SERVE_ARGS_MAY_DIFFER,
    capacity,
    cluster_specs,
    dockerfile_workdir,
    image_tag,
    images,
    pod_groups,
    quantity,
    ray_container,
    ray_version,
    shard_placement_problems,
    shm_problems,
)


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
            elif group.get("rayStartParams", {}).get("num-gpus") == "0":  # a CPU group by choice (index shards)
                if gpus or tolerates:
                    problems.append(f"{where}: a worker group with num-gpus '0' must neither request nor tolerate "
                                    f"{GPU}")
            elif uses_gpu and (gpus < 1 or GPU not in res.get("requests", {}) or not tolerates):
                problems.append(f"{where}: a GPU worker group must request and limit {GPU} >= 1 and tolerate "
                                f"{GPU_TOLERATION}")
            elif not uses_gpu and (gpus or tolerates):
                problems.append(f"{where}: a CPU-only cluster must neither request nor tolerate {GPU}")
            problems += shm_problems(where, group, pod, container)
        if uses_gpu and not capacity(spec)["gpus"]:
            problems.append(f"{label}: no GPU worker group")
    if not uses_gpu and GPU in json.dumps(objects):
        problems.append(f"{GPU} appears in a CPU-only kustomization")
    return problems


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
        problems += [f"{where}: {p}" for p in _storage_problems(script, cfg)]
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
    remote_zip = str(working_dir).startswith(REMOTE) and str(working_dir).endswith(".zip")
    if working_dir != dockerfile_workdir() and not remote_zip:
        problems.append(f"{where}: working_dir {working_dir!r} must be the image's {dockerfile_workdir()} or a "
                        "remote .zip")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in (env.get("env_vars") or {}).items()):
        problems.append(f"{where}: runtimeEnvYAML env_vars values must be strings (Ray refuses others)")
    return problems


def _storage_problems(script: str, cfg: VDRConfig) -> list[str]:
    """Pods share no filesystem: everything one job writes for another must be in a bucket."""
    uris = {"run.storage_path": cfg.run.storage_path, "index.output": cfg.index.output,
            "mine.output": cfg.mine.output, "evaluate.output": cfg.evaluate.output, "serve.index": cfg.serve.index,
            "serve.live": cfg.serve.live, "promote.model": cfg.promote.model, "promote.output": cfg.promote.output,
            "benchmark.output": cfg.benchmark.output, "benchmark.cache": cfg.benchmark.cache}
    if script == "benchmark":
        uris["benchmark.data_dir"] = cfg.benchmark.data_dir
    uris |= {f"index.sources[{i}]": s for i, s in enumerate(cfg.index.sources)}
    if script == "make_training_data":  # the other jobs never read the queries section
        uris |= {f"queries.sources[{i}]": s for i, s in enumerate(cfg.queries.sources)}
        uris["queries.output"] = cfg.queries.output
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
    elif script == "make_training_data":  # indexes the pages, generates (a VLM's replicas), mines: one after another
        q, gpu = cfg.queries, 1 if cfg.scaling.use_gpu else 0
        generation = [] if q.generator != "vlm" else _fits(
            q.vlm.replicas, gpu * q.vlm.tensor_parallel_size, q.vlm.cpus_per_actor, f"{q.vlm.replicas} VLM replicas x "
            f"({q.vlm.cpus_per_actor} CPU, {gpu * q.vlm.tensor_parallel_size} GPU)", cap)
        return _fit_problems("embed_corpus", cfg, cap) + generation + _fit_problems("mine_negatives", cfg, cap)
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
        problems += [f"{where}: {p}" for p in _key_problems(cfg, spec)]
        problems += [f"{where}: {p}" for p in _endpoint_problems(cfg, jobs, capacity(spec), uses_gpu)]
        problems += [f"{where}: {p}" for p in shard_placement_problems(cfg, spec)]
        problems += [f"{where}: {p}" for p in _promotion_problems(
            cfg, jobs.get("ray-vdr-promote"), service["metadata"]["name"], config["http_options"]["port"],
            app.get("route_prefix", "/"))]
    return problems


def _key_problems(cfg: ServeConfig, spec: dict[str, Any]) -> list[str]:
    """The endpoint reads its API keys from a Kubernetes Secret, through an environment variable every Ray container
    has (the ingress may run on any pod), never from the image or the serve config."""
    if cfg.auth.keys_file is not None or not cfg.auth.keys_env:
        return ["serve.auth must read the API keys from keys_env (a Secret), not a keys_file in the image or none"]
    problems = []
    for name, group in pod_groups(spec):
        env = {e["name"]: e for e in ray_container(group).get("env", [])}
        ref = (env.get(cfg.auth.keys_env) or {}).get("valueFrom", {}).get("secretKeyRef")
        if not ref:
            problems.append(f"{name}: no {cfg.auth.keys_env} from a Secret (serve.auth.keys_env)")
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


def _endpoint_problems(cfg: ServeConfig, jobs: dict[str, VDRConfig], cap: dict[str, float],
                       uses_gpu: bool) -> list[str]:
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
    shards = cfg.retriever.shards or (embed.index.shards if embed and embed.index.shards != "auto" else 1)
    if embed is not None and cfg.retriever.shards and embed.index.shards not in ("auto", cfg.retriever.shards):
        problems.append(f"retriever.shards {cfg.retriever.shards} is not the embed-corpus job's index.shards "
                        f"{embed.index.shards}: the retrievers would refuse the index")
    gpus += sum(d.max_replicas * (d.num_gpus or 0.0) for d in (cfg.ingress,))
    gpus += shards * cfg.retriever.max_replicas * (cfg.retriever.num_gpus or 0.0)
    cpus = sum(d.max_replicas * d.num_cpus for d in (*models, cfg.ingress))
    cpus += shards * cfg.retriever.max_replicas * cfg.retriever.num_cpus  # a Retriever group per shard
    if gpus > cap["gpus"] or cpus > cap["cpus"]:
        problems.append(f"at max_replicas the deployments need {gpus} GPUs and {cpus} CPUs; the cluster has {cap}")
    return problems
