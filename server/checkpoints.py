"""Per-round global model checkpoints, and finding the one to resume from."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from fedretain.models import ModelBundle

_NAME = re.compile(r"^round_(\d{4})\.pt$")


def checkpoint_path(out_dir: Path, server_round: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"round_{server_round:04d}.pt"


def save_checkpoint(out_dir: Path, server_round: int, bundle: ModelBundle) -> Path:
    path = bundle.save(checkpoint_path(out_dir, server_round))
    final = Path(out_dir) / "model.pt"
    # the newest global model, for `fedretain score`: a byte copy, so it has the round's model_sha256
    tmp = final.with_name(final.name + ".tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, final)
    return path


def latest_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    """(round, path) of the newest readable checkpoint, or None."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))
    )
    return found[-1] if found else None


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file: how a run record, an officer and a node name one model exactly."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
