"""A Ray Train worker alone in its world trains without DDP on CPU (accelerate wraps a CPU model in DDP whenever
LOCAL_RANK is set, which Ray Train always sets); with company, or under DeepSpeed, it keeps its process group."""

from __future__ import annotations

import textwrap

import pytest

from ray_vdr.config import VDRConfig
from tests.probes import Probes

PROBE = textwrap.dedent("""
    import os, sys, tempfile
    import torch, torch.distributed as dist
    from ray_vdr.config import VDRConfig
    from ray_vdr.train.worker import _one_process_without_ddp

    world, strategy = int(sys.argv[1]), sys.argv[2]
    # what Ray Train's torch backend leaves in a worker: the env and a gloo process group (here of one process)
    os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    cfg = VDRConfig.model_validate({"train": {"strategy": strategy}})
    _one_process_without_ddp(cfg, world, cuda=False)
    from accelerate import Accelerator
    model = Accelerator(cpu=True).prepare_model(torch.nn.Linear(4, 4))
    print(type(model).__name__)
""")


CASES = [(1, "ddp", "Linear"), (2, "ddp", "DistributedDataParallel")]


@pytest.fixture(scope="module")
def probes():
    """Both cases' probes, each in a fresh process, started together."""
    started = Probes({f"{world}-{strategy}": (PROBE, str(world), strategy) for world, strategy, _ in CASES})
    yield started
    started.close()


@pytest.mark.parametrize("world,strategy,wrapped", CASES)
def test_a_world_of_one_cpu_worker_is_not_wrapped_in_ddp(probes, world, strategy, wrapped):
    out = probes.result(f"{world}-{strategy}", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == wrapped


def test_deepspeed_keeps_its_environment(monkeypatch):
    from ray_vdr.train.worker import _one_process_without_ddp

    monkeypatch.setenv("LOCAL_RANK", "0")
    _one_process_without_ddp(VDRConfig.model_validate({"train": {"strategy": "deepspeed"}}), 1, cuda=False)
    _one_process_without_ddp(VDRConfig.model_validate({}), 1, cuda=True)
    import os

    assert os.environ["LOCAL_RANK"] == "0"
