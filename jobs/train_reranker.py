"""Finetune the multimodal reranker on mined triplets (Ray Train).

    python jobs/train_reranker.py --config configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/train_reranker.py --config configs/qwen3vl-2b-vdr.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from ray_vdr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-reranker", *sys.argv[1:]]))
