"""Public benchmarks (ViDoRe / MTEB layouts) for one or more models, as their leaderboards score them.

    python jobs/benchmark.py --config configs/demo.yaml benchmark.tasks=[path/to/task] [key=value ...]
    ray job submit --working-dir . -- python jobs/benchmark.py --config configs/qwen3vl-2b-vdr.yaml \
        benchmark.tasks=[vidore-v3] benchmark.data_dir=s3://bucket/benchmarks
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from ray_vdr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
