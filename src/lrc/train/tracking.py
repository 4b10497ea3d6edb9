"""Weights & Biases logging (`--wandb PROJECT`, optional): the records of metrics.jsonl, as they are written.

Each record's numbers go to W&B under `SPLIT/NAME` at the record's step (`train/loss`, `val/loss`, ...), the
same keys TensorBoard gets. The W&B run id is kept in RUN_DIR/wandb-id so `--resume` continues the same
W&B run. `WANDB_MODE=offline` logs into RUN_DIR/wandb/ without network (`wandb sync` uploads it later).
"""

from __future__ import annotations

import uuid
from pathlib import Path

from lrc.errors import UserError


def require_wandb() -> None:
    """UserError unless wandb can be imported (checked before a run directory is written)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--wandb needs the wandb package, which is not installed: pip install "
                        "'lowrankclone[wandb]' (or drop --wandb; metrics.jsonl has the same records)") from None


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as W&B's flat `SPLIT/NAME` numbers (step and split are the coordinates)."""
    split = record.get("split", "train")
    return {f"{split}/{k}": v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "split")}


class WandbTracker:
    def __init__(self, project: str, run_dir: Path, config: dict):
        import wandb  # the optional [wandb] extra

        id_file = run_dir / "wandb-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, dir=str(run_dir), name=run_dir.name, id=run_id, resume="allow",
                              config=config)

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
