"""Embed a page corpus (image files, PDFs, Parquet with image bytes) and build its FAISS index.

    python jobs/embed_corpus.py --config configs/demo.yaml [index.sources=[./pages] index.output=./index ...]
    ray job submit --working-dir . -- python jobs/embed_corpus.py --config configs/qwen3vl-2b-vdr.yaml

Rerunning over the same sources skips pages already embedded; new files are embedded and added to the index.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, also under `ray job submit`

from ray_vdr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
