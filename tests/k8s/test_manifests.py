"""Every kustomization under k8s/ rendered by kustomize and checked: CRD schemas, image and Ray version, cluster specs,
pods, jobs, the RayService; the Dockerfile and .dockerignore (see tests/k8s/__init__.py)."""

from __future__ import annotations

import os
import re
import shlex
import shutil

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.k8s.checks import (
    agreement_problems,
    job_problems,
    pod_problems,
    service_problems,
    version_problems,
)
from tests.k8s.manifests import (
    CRD_DIR,
    K8S,
    ROOT,
    SHARED_CRD_DIR,
    USES_GPU,
    dockerfile_base,
    dockerfile_workdir,
    idle_patches,
    image_name,
    image_tag,
    images,
    instructions,
    kustomizations,
    pyproject,
    ray_requirement,
    ray_version,
    rendered,
    schema_errors,
)


def test_every_kustomization_is_validated():
    assert kustomizations() == sorted(USES_GPU), "a kustomization under k8s/ is missing from USES_GPU (or gone)"


@pytest.mark.parametrize("name", sorted(USES_GPU))
def test_every_patch_changes_the_rendering(tmp_path, name):
    shutil.copytree(K8S, tmp_path / "k8s")
    idle = idle_patches(tmp_path / "k8s" / name)
    assert not idle, "\n".join(idle)


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
    steps = instructions()
    workdir = dockerfile_workdir()
    assert workdir == "/app"
    copies = [args.split() for instr, args in steps if instr == "COPY"]
    assert any(parts[-2:] in ([".", workdir], [".", "."]) for parts in copies), f"the repo is not copied to {workdir}"
    runs = " ".join(args for instr, args in steps if instr == "RUN")
    assert re.search(r"pip install [^;&|]*\"?\.\[gpu\]\"?", runs), "no `pip install .[gpu]`"
    assert any(instr == "ARG" and args.startswith("FLASH_ATTN=") for instr, args in steps)
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
