"""Model promotion: re-embed the live corpus with a candidate embedder, evaluate it against the live one on the eval
split, and switch the running endpoint (which follows serve.live) to it only if NDCG@10 is not worse.

    python jobs/promote.py --config configs/demo.yaml promote.model=<model> serve.live=<live.json>
    ray job submit --working-dir . -- python jobs/promote.py --config configs/qwen3vl-2b-vdr.yaml promote.model=s3://...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from ray_vdr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
