"""docs/benchmarks.md is what `python bench/report.py --render` makes of the stored results and notes, and every
bench script records its results for it (``--json``) with the date, the machine and a command without machine paths.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402


def test_the_page_is_rendered_from_the_results_and_notes():
    """Edit docs/bench/notes/ or rerun a bench, then `python bench/report.py --render`: never the page by hand."""
    assert report.PAGE.read_text() == report.render(), "docs/benchmarks.md is stale: python bench/report.py --render"


def test_every_bench_script_is_in_the_report_and_takes_json():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")} - {"report.py", "common.py"}
    assert scripts == {Path(b.script).name for b in report.BENCHES.values()}, "a bench script the page leaves out"
    for name in scripts:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / name), "--help"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "--json" in out.stdout, (name, out.stderr[-2000:])
    notes = {p.stem for p in report.NOTES.glob("*.md")}
    assert notes == {s.notes for s in report.SECTIONS}, "a notes file no section shows, or a section without notes"


def test_stored_results_render_and_name_their_run():
    results = sorted(report.RESULTS.glob("*.json"))
    for path in results:
        key, _, profile = path.stem.rpartition("-")
        r = json.loads(path.read_text())
        assert key in report.BENCHES and profile in report.BENCHES[key].profiles, path.name
        assert r["command"].startswith(f"python {report.BENCHES[key].script}"), r["command"]
        assert "/work" not in json.dumps(r) and "/tmp" not in json.dumps(r), f"a machine path in {path.name}"
        assert {"date", "machine"} <= set(r) and r["machine"]["cpus"]
        assert report.BENCHES[key].render(r), path.name


def test_command_line_drops_machine_paths(monkeypatch):
    import common

    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "serve_load.py"), "--requests", "10", "--json",
                                      "/some/where/x.json", "--out=/tmp/w", "--pages", "5"])
    assert common.command_line() == "python bench/serve_load.py --requests 10 --pages 5"
