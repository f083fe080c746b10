"""Describing a model file without building its tensors (what `quantfmt inspect` prints)."""

from __future__ import annotations

import math

from ..plugins import has_format
from ..sources import RECIPE_KEY


def describe(model) -> dict:
    """What `quantfmt inspect --json` prints: every tensor, totals, the recipe and metadata."""
    tensors = []
    have: dict[str, bool] = {}  # whether a plugin provides the tag, without importing its module
    for t in model.sources():
        if t.tag not in have:
            have[t.tag] = has_format(t.tag)
        n = math.prod(t.shape)
        tensors.append({"name": t.name, "tag": t.tag, "shape": list(t.shape), "bytes": t.nbytes,
                        "bits_per_weight": 8.0 * t.nbytes / n if n else 0.0, "installed": have[t.tag]})
    weights = sum(math.prod(t["shape"]) for t in tensors)
    total = sum(t["bytes"] for t in tensors)
    by_tag: dict[str, dict] = {}
    for t in tensors:
        a = by_tag.setdefault(t["tag"], {"tensors": 0, "weights": 0, "bytes": 0})
        a["tensors"] += 1
        a["weights"] += math.prod(t["shape"])
        a["bytes"] += t["bytes"]
    meta = dict(model.metadata)
    recipe = meta.pop(RECIPE_KEY, None)
    return {
        "file": str(model.path),
        "tensors": tensors,
        "totals": {"tensors": len(tensors), "weights": weights, "bytes": total,
                   "bits_per_weight": 8.0 * total / weights if weights else 0.0, "by_tag": by_tag},
        "recipe": recipe,
        "metadata": meta,
    }
