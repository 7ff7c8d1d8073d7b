"""The files a training run leaves in its checkpoints and final model: named once, for the workers that write them
(ray_vdr.train.worker) and the driver that reads them (ray_vdr.train.run), which need not import the training stack."""

from __future__ import annotations

__all__ = ["FINAL_FILE", "HISTORY_FILE", "STATE_FILE"]

STATE_FILE = "ray_vdr_state.json"  # data position and base evaluation, in every intermediate checkpoint
HISTORY_FILE = "ray_vdr_rows.parquet"  # rows trained before the checkpoint (row_id, epoch, step, rank)
FINAL_FILE = "ray_vdr_train.json"  # marks the final artifact (metrics and config)
