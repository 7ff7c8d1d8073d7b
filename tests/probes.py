"""Python probes in fresh interpreters, started together by a module's fixture: each is mostly imports (torch,
transformers, Sentence Transformers) on one core, so two run side by side in about the time of one."""

from __future__ import annotations

import subprocess
import sys


class Probes:
    """Start every probe now (``name -> (code, *argv)``, run as ``python -c code *argv``); :meth:`result` waits for
    one; :meth:`close` kills those still running."""

    def __init__(self, probes: dict[str, tuple[str, ...]]):
        self._procs = {name: subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)
                       for name, (code, *argv) in probes.items()}

    def result(self, name: str, timeout: float) -> subprocess.CompletedProcess:
        proc = self._procs[name]
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
