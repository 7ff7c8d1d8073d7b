"""Make training triplets from unlabeled documents: generated queries, filters, hard negatives, a by-document split.

    python jobs/make_training_data.py --config configs/demo-own-docs.yaml [queries.sources=[./pdfs] ...]
    ray job submit --working-dir . -- python jobs/make_training_data.py --config configs/qwen3vl-2b-vdr.yaml \\
        'queries.sources=[s3://bucket/pdfs]' queries.output=s3://bucket/training-data
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from ray_vdr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-training-data", *sys.argv[1:]]))
