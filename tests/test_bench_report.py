"""docs/benchmarks.md is what `python -m bench.report --render` makes of the stored results and notes, and every
bench script records its results for it (``--json``) with the date, the machine and a command without machine paths.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench import common, report

ROOT = common.ROOT
NOT_BENCHES = {"__init__", "common", "report", "synthetic_vectors"}


def test_the_page_is_rendered_from_the_results_and_notes():
    """Edit docs/bench/notes/ or rerun a bench, then `python -m bench.report --render`: never the page by hand."""
    assert report.PAGE.read_text() == report.render(), "docs/benchmarks.md is stale: python -m bench.report --render"


def test_every_bench_script_is_in_the_report_and_takes_json():
    scripts = {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")} - {f"bench.{n}" for n in NOT_BENCHES}
    assert scripts == {b.module for b in report.BENCHES.values()}, "a bench script the page leaves out"
    for module in scripts:  # run as the docs say, from the repo root
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "--json" in out.stdout, (module, out.stderr[-2000:])
    notes = {p.stem for p in report.NOTES.glob("*.md")}
    assert notes == {s.notes for s in report.SECTIONS}, "a notes file no section shows, or a section without notes"


def test_stored_results_render_and_name_their_run():
    results = sorted(report.RESULTS.glob("*.json"))
    for path in results:
        key, _, profile = path.stem.rpartition("-")
        r = json.loads(path.read_text())
        assert key in report.BENCHES and profile in report.BENCHES[key].profiles, path.name
        assert r["command"].startswith(f"python -m {report.BENCHES[key].module}"), r["command"]
        assert "/work" not in json.dumps(r) and "/tmp" not in json.dumps(r), f"a machine path in {path.name}"
        assert {"date", "machine"} <= set(r) and r["machine"]["cpus"]
        assert report.BENCHES[key].render(r), path.name


def test_command_line_drops_machine_paths(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "serve_load.py"), "--requests", "10", "--json",
                                      "/some/where/x.json", "--out=/tmp/w", "--pages", "5"])
    assert common.command_line() == "python -m bench.serve_load --requests 10 --pages 5"
