"""Deterministic weights and inputs of the official-parity fixtures (shared/parity/README.md)."""
from __future__ import annotations

import math
import re
import zlib
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor

ALIAS_PREFIX = "transformer.decoder.bbox_embed."


def regenerated_tensor(key: str, shape: Iterable[int], seed: int) -> Tensor:
    """The fixture value of one official state-dict entry (float32).

    key: official name, e.g. ``def_detr.transformer.encoder.layers.0.self_attn.sampling_offsets.weight``;
    the aliased ``transformer.decoder.bbox_embed.*`` keys draw from the ``bbox_embed.*`` stream so both
    names get identical values. shape: the entry's shape; seed: the fixture's ``seed``.
    """
    shape = tuple(int(s) for s in shape)
    key = key.replace(ALIAS_PREFIX, "bbox_embed.")
    rs = np.random.RandomState((zlib.crc32(key.encode("utf-8")) ^ seed) & 0xFFFFFFFF)
    last = key.rsplit(".", 1)[-1]
    if last == "running_var":
        v = rs.uniform(0.5, 2.0, shape)
    elif last == "running_mean":
        v = rs.uniform(-0.2, 0.2, shape)
    elif key.endswith(("level_embed", "temporal_embed", "query_embed.weight")):
        v = rs.uniform(-1.5, 1.5, shape)
    elif len(shape) == 1 and last == "weight":
        v = rs.uniform(0.5, 1.5, shape)
    elif last.endswith("bias"):
        v = rs.uniform(-0.2, 0.2, shape)
    else:
        v = rs.uniform(-1.0, 1.0, shape) * math.sqrt(3 / math.prod(shape[1:]))
    return torch.from_numpy(np.asarray(v)).to(torch.float32)


def regenerated_state_dict(shapes: Mapping[str, Iterable[int]], seed: int) -> dict[str, Tensor]:
    """``regenerated_tensor`` for every (official key -> shape) entry."""
    return {k: regenerated_tensor(k, s, seed) for k, s in shapes.items()}


def checksum(t: Tensor) -> tuple[float, float]:
    """(sum, sum of absolute values) in float64 of a tensor, as stored in the fixtures' ``checksums``."""
    d = t.detach().to(torch.float64)
    return float(d.sum()), float(d.abs().sum())


def fixture_images(seed_input: int, image_sizes: Iterable[Iterable[int]], channels: int = 3) -> list[Tensor]:
    """Mask-head fixture images: image i = RandomState(seed_input + i).standard_normal((3, H_i, W_i)), float64."""
    return [torch.from_numpy(np.random.RandomState(seed_input + i).standard_normal((channels, int(h), int(w))))
            for i, (h, w) in enumerate(image_sizes)]


def fixture_clip(seed_input: int, input_shape: Iterable[int]) -> Tensor:
    """DeVIS fixture clip (T, 3, H, W) float64: RandomState(seed_input).standard_normal(input_shape)."""
    shape = tuple(int(s) for s in input_shape)
    return torch.from_numpy(np.random.RandomState(seed_input).standard_normal(shape))


def official_shapes(listing: str | Path) -> dict[str, tuple[int, ...]]:
    """key -> shape from a ``state_dict_*.txt`` listing (lines ``key (d0, d1, ...) kind requires_grad``,
    made by instantiating the official model on CPU); ``#`` lines and blank lines are skipped."""
    shapes = {}
    for line in Path(listing).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"(\S+) \(([^)]*)\)", line)
        if m is None:
            raise ValueError(f"{listing}: cannot read a key and shape from line {line!r}")
        shapes[m.group(1)] = tuple(int(x) for x in m.group(2).replace(",", " ").split())
    return shapes
