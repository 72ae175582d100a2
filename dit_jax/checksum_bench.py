r"""Cost of a checkpoint's checksums (`integrity.summarize`) for a DiT train state: a table.

  python -m dit_jax.checksum_bench --variant=B/2 --repeats=3
  python -m dit_jax.checksum_bench --variant=XL/2 --input-size=32 --repeats=3

The state is what a checkpoint holds (params, EMA params and Adam's two moments of `--variant`,
float32, random values; the step), on the default device. Each method of `integrity.summarize`
("host": numpy over each process's shards, the default on CPU devices; "device": one jitted XLA
reduction, the default elsewhere) and a plain jitted float sum over the same arrays (the
reference) is called once (first call: with compiling), then `--repeats` times in turn; the
table gives the first call, the minimum and the median, and the minimum scaled to DiT-XL/2's
10.8 GB state. The two methods must agree (checked). On a loaded machine compare the rows of
one run, not runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import errors
from dit_jax import integrity
from dit_jax.models import variants

PROG = "python -m dit_jax.checksum_bench"
XL2_STATE_GB = 10.8  # DiT-XL/2 at 256 (32x32 latents): params, EMA, two Adam moments, float32.


def random_state(variant: str, input_size: int, seed: int = 0) -> dict:
  """A DiT train state of random float32 values: {"step", "params", "ema_params", "opt_state"}."""
  model = variants.build(variant, input_size=input_size)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, input_size, input_size, model.in_channels)),
      jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"])
  rng = np.random.default_rng(seed)

  def fill(a):
    return jnp.asarray(rng.standard_normal(a.shape, np.float32) * 0.02)

  return {"step": jnp.int32(1), "params": jax.tree.map(fill, abstract),
          "ema_params": jax.tree.map(fill, abstract),
          "opt_state": {"mu": jax.tree.map(fill, abstract), "nu": jax.tree.map(fill, abstract)}}


def measure(state, repeats: int) -> tuple[dict[str, list[float]], float]:
  """{method: [first call, repeats...] seconds} and the state's size in GB."""
  leaves = jax.tree.leaves(state)
  float_sum = jax.jit(lambda t: [jnp.sum(x.astype(jnp.float32)) for x in t])
  runs: dict[str, Callable[[], object]] = {
      "host (numpy over shards)": lambda: integrity.summarize(state, "host"),
      "device (XLA reduction)": lambda: integrity.summarize(state, "device"),
      "float sum (reference)": lambda: jax.block_until_ready(float_sum(leaves)),
  }
  times: dict[str, list[float]] = {k: [] for k in runs}
  results = {}
  for _ in range(1 + repeats):
    for name, run in runs.items():
      t0 = time.perf_counter()
      results[name] = run()
      times[name].append(time.perf_counter() - t0)
  if results["host (numpy over shards)"] != results["device (XLA reduction)"]:
    raise AssertionError("the host and device checksums differ")
  return times, sum(x.nbytes for x in leaves) / 1e9


def format_table(times: dict[str, list[float]], gigabytes: float) -> str:
  rows = ["| method | first call (s) | min (s) | median (s) | at XL/2's 10.8 GB (s) |",
          "|---|---|---|---|---|"]
  for name, t in times.items():
    rest = t[1:] or t
    rows.append(f"| {name} | {t[0]:.2f} | {min(rest):.2f} | {statistics.median(rest):.2f} | "
                f"{min(rest) * XL2_STATE_GB / gigabytes:.1f} |")
  return "\n".join(rows)


def _main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="B/2", help="DiT variant (default B/2)")
  parser.add_argument("--input-size", type=int, default=32, help="latent size (32 = 256 px)")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  try:
    variants.parse(args.variant)
  except ValueError as e:
    raise errors.UserError(f"--variant {args.variant!r}: {e}") from e
  if args.repeats < 1 or args.input_size < 1:
    raise errors.UserError(f"--repeats={args.repeats} and --input-size={args.input_size} must "
                           "be >= 1")
  state = random_state(args.variant, args.input_size)
  load = os.getloadavg()
  times, gigabytes = measure(state, args.repeats)
  print(f"{args.variant}: {len(jax.tree.leaves(state))} arrays, {gigabytes:.3f} GB on "
        f"{jax.devices()[0].device_kind}; load average {load[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after")
  print(format_table(times, gigabytes))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return errors.run_cli(PROG, _main, argv)


if __name__ == "__main__":
  raise SystemExit(main())
