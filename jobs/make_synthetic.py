"""Write the synthetic VDR dataset described by a config's `synthetic` section (Parquet + images/JSONL).

    python jobs/make_synthetic.py --config configs/demo.yaml [synthetic.train_queries=5000 ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from ray_vdr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-data", *sys.argv[1:]]))
