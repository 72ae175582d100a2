"""Timestep respacing: which of the T original steps a K-step sampler keeps, and its betas.

This module owns the official `space_timesteps` and the respaced beta schedule of
`SpacedDiffusion`, reproduced exactly:

* ``"a,b,..."`` (or a list of ints): the T steps are cut into len(counts) consecutive sections
  of near-equal size (the first ``T % len(counts)`` get one extra step). A section starting at
  ``start`` with ``size`` steps and count ``n`` keeps ``start + round(cur)`` for
  ``cur = 0, stride, stride + stride, ...`` (n values, accumulated by repeated float64
  addition), ``stride = (size - 1) / (n - 1)`` (1 when n <= 1), with Python's ``round``
  (halves to even). The union is a set, so it is sorted and duplicates vanish.
* ``"ddimN"``: the smallest integer stride s in [1, T) with ``len(range(0, T, s)) == N``;
  keeps ``range(0, T, s)``.

Respaced betas, with m = sorted kept steps and alpha_bar the original cumulative product:
    beta'_k = 1 - alpha_bar[m_k] / alpha_bar[m_{k-1}],   alpha_bar[m_{-1}] := 1.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

SectionCounts = Union[str, Sequence[int]]


def space_timesteps(num_timesteps: int, section_counts: SectionCounts) -> set[int]:
  """The set of original timesteps kept (official `space_timesteps`, bit-exact)."""
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      try:
        desired = int(section_counts[len("ddim"):])
      except ValueError:
        raise ValueError(f"timestep_respacing={section_counts!r}: expected 'ddimN' with an "
                         "integer N") from None
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return set(range(0, num_timesteps, stride))
      raise ValueError(f"timestep_respacing={section_counts!r}: cannot create exactly "
                       f"{desired} steps out of {num_timesteps} with an integer stride")
    try:
      section_counts = [int(x) for x in section_counts.split(",")]
    except ValueError:
      raise ValueError(f"timestep_respacing={section_counts!r}: expected comma-separated "
                       "integers like '250' or '10,20,30', or 'ddimN'") from None
  section_counts = list(section_counts)
  if not section_counts:
    raise ValueError("timestep_respacing: section counts must not be empty")
  size_per = num_timesteps // len(section_counts)
  extra = num_timesteps % len(section_counts)
  start_idx = 0
  all_steps = []
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if count <= 0:
      raise ValueError(f"timestep_respacing: section {i} count {count} must be positive")
    if size < count:
      raise ValueError(f"timestep_respacing: cannot divide section {i} of {size} steps "
                       f"into {count}")
    frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      all_steps.append(start_idx + round(cur))  # Python round: halves to even.
      cur += frac_stride                        # accumulated, not k * stride.
    start_idx += size
  return set(all_steps)


def timestep_map(use_timesteps) -> np.ndarray:
  """Sorted kept timesteps as int64: respaced step k runs the model at timestep_map[k]."""
  return np.array(sorted(set(int(s) for s in use_timesteps)), dtype=np.int64)


def respace_betas(betas: np.ndarray, use_timesteps) -> tuple[np.ndarray, np.ndarray]:
  """Returns (respaced betas float64, timestep_map int64), as official `SpacedDiffusion`."""
  betas = np.asarray(betas, dtype=np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
  use = set(int(s) for s in use_timesteps)
  bad = sorted(s for s in use if not 0 <= s < len(betas))
  if bad:
    raise ValueError(f"use_timesteps contains {bad[:5]} outside [0, {len(betas)})")
  last = 1.0
  new_betas, tmap = [], []
  for i, abar in enumerate(alphas_cumprod):
    if i in use:
      new_betas.append(1 - abar / last)
      last = abar
      tmap.append(i)
  return np.array(new_betas, dtype=np.float64), np.array(tmap, dtype=np.int64)
