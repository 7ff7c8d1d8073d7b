"""What every bench script records with its figures: when, on what machine and software, with which command."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU count, GPU (if any), and the versions that move the figures."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    for pkg in ("torch", "ray", "sentence-transformers", "transformers", "deepspeed", "faiss-cpu", "faiss-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[pkg] = metadata.version(pkg)
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def command_line() -> str:
    """This script's command line as run from the repo root, without --json/--out (machine paths)."""
    root = Path(__file__).resolve().parents[1]
    script = Path(sys.argv[0]).resolve()
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--json", "--out"):
            skip = True
            continue
        if not a.startswith(("--json=", "--out=")):
            argv.append(a)
    name = script.relative_to(root).as_posix() if script.is_relative_to(root) else script.name
    return " ".join(["python", name, *argv])


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """Write ``report`` with the date, the machine and the command line to ``path`` (``--json``; None = skip).
    Machine paths (``out``, ``json``) are left out of the recorded arguments."""
    if not path:
        return
    if isinstance(report.get("args"), dict):
        report = {**report, "args": {k: v for k, v in report["args"].items() if k not in ("out", "json", "probe")}}
    out = {**report, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command_line()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"results: {path}")
