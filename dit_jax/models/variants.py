"""Registry of named DiT configurations: the 12 official variants and tiny test models.

Official variants `DiT-{S,B,L,XL}/{2,4,8}` fix (hidden_size, depth, num_heads) and patch_size,
as the official `DiT_models` dict (mlp_ratio 4):

  S: 384 / 12 / 6    B: 768 / 12 / 12    L: 1024 / 24 / 16    XL: 1152 / 28 / 16

Names are accepted as `DiT-XL/2`, `XL/2` or `DiT-XL_2` (the file-name form). The tiny entries
are the configurations of the reference vectors in tests/data (`tiny-A`: model_tiny.npz,
`tiny-B`: model_tiny_p4.npz) and fix every architecture field.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from dit_jax.models.dit import DiT

_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
_PATCHES = (2, 4, 8)

_TINY = {
    "tiny-A": dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
                   num_heads=4, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10,
                   learn_sigma=True),
    "tiny-B": dict(input_size=20, patch_size=4, in_channels=4, hidden_size=96, depth=3,
                   num_heads=6, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=7,
                   learn_sigma=False),
}

OFFICIAL_NAMES = tuple(f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in _PATCHES)
NAMES = OFFICIAL_NAMES + tuple(_TINY)

_OFFICIAL_RE = re.compile(r"^(?:DiT-)?(S|B|L|XL)[/_](\d+)$")


def canonical_name(name: str) -> str:
  """`"XL/2"`, `"DiT-XL_2"` -> `"DiT-XL/2"`; tiny names unchanged. ValueError if unknown."""
  if name in _TINY:
    return name
  m = _OFFICIAL_RE.match(name) if isinstance(name, str) else None
  if m and int(m.group(2)) in _PATCHES:
    return f"DiT-{m.group(1)}/{int(m.group(2))}"
  raise ValueError(f"unknown DiT variant {name!r}; known variants: {', '.join(NAMES)} "
                   "(official names also as 'XL/2' or 'DiT-XL_2')")


def parse(name: str) -> dict[str, Any]:
  """Architecture kwargs of a variant, e.g. `parse("XL/2")` -> patch_size, hidden_size, ..."""
  name = canonical_name(name)
  if name in _TINY:
    return dict(_TINY[name])
  size, patch = name[len("DiT-"):].split("/")
  return dict(patch_size=int(patch), mlp_ratio=4.0, **_SIZES[size])


def build(name: str, **overrides: Any) -> DiT:
  """`DiT(**parse(name), **overrides)`; overrides win (e.g. input_size, num_classes, dtype)."""
  fields = {f.name for f in dataclasses.fields(DiT)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown DiT field(s) {unknown} for variant {name!r}; "
                     f"fields: {sorted(fields)}")
  return DiT(**{**parse(name), **overrides})
