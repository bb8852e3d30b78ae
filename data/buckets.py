"""Resolution x aspect-ratio buckets (Qwen-Image's ratios), sizes rounded to what the VAE and patching accept."""

from __future__ import annotations

import math


def bucket_size(resolution: int, ratio: str, multiple: int = 16) -> tuple[int, int]:
    """(width, height) with about resolution**2 pixels at width:height = ratio, both multiples of `multiple`."""
    rw, rh = (int(x) for x in ratio.split(":"))
    height = resolution * math.sqrt(rh / rw)
    width = height * rw / rh
    snap = lambda v: max(multiple, int(round(v / multiple)) * multiple)  # noqa: E731
    return snap(width), snap(height)


def buckets_for(resolution: int, ratios: list[str], multiple: int = 16) -> list[tuple[int, int]]:
    """Distinct bucket sizes for one resolution stage, in the order of `ratios`."""
    out: list[tuple[int, int]] = []
    for ratio in ratios:
        size = bucket_size(resolution, ratio, multiple)
        if size not in out:
            out.append(size)
    return out
