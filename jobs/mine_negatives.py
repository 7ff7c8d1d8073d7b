"""Mine hard negatives for the training queries from the corpus index (Ray Data).

    python jobs/mine_negatives.py --config configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/mine_negatives.py --config configs/qwen3vl-2b-vdr.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from ray_vdr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["mine", *sys.argv[1:]]))
