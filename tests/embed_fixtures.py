"""Helpers shared by the embedding tests: small configs, reading an output back as a plain user would."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from bitray.config import EmbedConfig

SIZE = 32


def tiny_config(inputs: list[str], output: str, **kwargs) -> EmbedConfig:
    defaults = {
        "model": "random:tiny",
        "image_size": SIZE,
        "batch_size": 4,
        "rows_per_file": 8,
        "actors_max": 1,
    }
    return EmbedConfig(inputs=inputs, output=output, **{**defaults, **kwargs})


def read_output(output: str | Path, filesystem=None) -> tuple[pd.DataFrame, pd.DataFrame]:  # noqa: ANN001
    """The embeddings and errors of an output prefix, read with pyarrow alone (no bitray)."""
    frames = []
    for part in ("embeddings", "errors"):
        path = f"{str(output).rstrip('/')}/{part}"
        try:
            frames.append(pq.read_table(path, filesystem=filesystem).to_pandas())
        except (FileNotFoundError, OSError):
            frames.append(pd.DataFrame(columns=["path"]))
    return frames[0], frames[1]


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under a local output with its mtime and content, except the lock file."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def write_photos(directory: Path, count: int, *, seed: int = 0, side: int = 40) -> list[Path]:
    """``count`` small distinct JPEGs."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img-{seed}-{i:03d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side + i % 7, 3), dtype=np.uint8)).save(buf, "JPEG")
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def published(output: Path, kind: str = "embeddings") -> list[Path]:
    """The data files a reader of the output sees."""
    return sorted((output / kind).glob("*.parquet")) if (output / kind).is_dir() else []


def read_summary(output: Path, run_id: str) -> dict:
    return json.loads((output / "_bitray" / "runs" / run_id / "summary.json").read_text())
