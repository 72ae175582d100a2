"""ADM's evaluation (FID, sFID, Inception Score, precision, recall) of a sample file.

  python -m dit_jax.evaluation --ref VIRTUAL_imagenet256_labeled.npz --samples samples.npz \\
      [--inception-weights weights-inception-2015-12-05-6726825d.pth]

Prints how the samples were drawn (the file's `dit_jax_meta`), a progress bar per batch, the
table, and writes `<samples>.eval.json` beside the samples. Features are batch-sharded over
all devices (and hosts: start every process with `--distributed`); the reference batch's
features are cached beside it (`--ref-cache`). Definitions: `evaluation.adm_eval`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

from dit_jax import errors, sharding
from dit_jax.evaluation import adm_eval, features, inception, inception_weights, npz_images

PROG = "python -m dit_jax.evaluation"
TIED_NOISE = ("centered", "antithetic")
ROWS = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
        ("Precision", "precision"), ("Recall", "recall"))


def read_meta(path) -> dict | None:
  """The sample file's `dit_jax_meta` record (None for files without one, e.g. official)."""
  import numpy as np
  if "dit_jax_meta" not in npz_images.members(path):
    return None
  with np.load(path, allow_pickle=False) as z:
    try:
      return json.loads(str(z["dit_jax_meta"]))
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{path}: dit_jax_meta is not JSON ({e})") from e


def meta_warnings(meta: dict | None) -> list[str]:
  """Why the figures may not compare with published ones."""
  if not meta:
    return []
  noise = meta.get("noise")
  if noise in TIED_NOISE:
    return [f"the samples were drawn with tied noise (noise={noise!r}): their FID & co are not "
            "comparable with i.i.d. baselines such as the paper's (sample with noise 'iid')"]
  return []


def format_table(results: dict) -> str:
  lines = [f"{'metric':<16} {'value':>10}"]
  lines += [f"{name:<16} {results[key]:>10.4f}" for name, key in ROWS]
  return "\n".join(lines)


def build_model(precision: str) -> inception.InceptionV3:
  return inception.InceptionV3(precision=precision)


def _parse(argv):
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--ref", required=True,
                      help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz, or any "
                           "uint8 image npz with arr_0)")
  parser.add_argument("--samples", required=True, help="sample batch .npz (arr_0 uint8 NHWC)")
  parser.add_argument("--inception-weights", default=None,
                      help="the FID Inception .pth (torch-fidelity or pytorch-fid); default: "
                           f"either file name in {inception_weights.DEFAULT_DIR}")
  parser.add_argument("--per-device-batch", type=int, default=64)
  parser.add_argument("--ref-cache", default=None,
                      help="reference features cache (default: <ref>.inception_features.npz "
                           "beside the reference)")
  parser.add_argument("--no-ref-cache", action="store_true")
  parser.add_argument("--out", default=None, help="JSON output (default <samples>.eval.json)")
  parser.add_argument("--precision", default="highest", choices=("highest", "default"),
                      help="conv/matmul precision: highest = float32 as the reference graph")
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() first (multi-host)")
  return parser.parse_args(argv)


def _progress_factory(enabled: bool):
  from tqdm.auto import tqdm

  def make(total, desc):
    bar = tqdm(total=total, desc=desc, unit="img", disable=not enabled, smoothing=0.1)
    def update(n):
      bar.update(n)
      if bar.n >= total:
        bar.close()
    return update
  return make


def _main(argv) -> int:
  args = _parse(argv)
  if args.per_device_batch < 1:
    raise errors.UserError(f"--per-device-batch {args.per_device_batch}: must be >= 1")
  for flag, path in (("--ref", args.ref), ("--samples", args.samples)):
    if not pathlib.Path(path).is_file():
      raise errors.UserError(f"{flag} {path}: no such file")
  if args.distributed:
    jax.distributed.initialize()
  lead = jax.process_index() == 0
  log = print if lead else (lambda *a, **k: None)
  meta = read_meta(args.samples)
  log(f"samples: {args.samples}")
  log(f"  drawn as: {json.dumps(meta, sort_keys=True) if meta else '(no dit_jax_meta record)'}")
  warnings = meta_warnings(meta)
  for w in warnings:
    print(f"{PROG}: WARNING: {w}", file=sys.stderr)

  weights_path = inception_weights.resolve_path(args.inception_weights)
  params = inception_weights.load(weights_path)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  extractor = features.FeatureExtractor(mesh, build_model(args.precision),
                                        args.per_device_batch)
  log(f"Inception: {weights_path}; {jax.device_count()} devices, {jax.process_count()} "
      f"process(es), global batch {extractor.batch_size}")
  params = extractor.replicate(params)
  cache = None if args.no_ref_cache else (args.ref_cache or adm_eval.default_cache_path(args.ref))
  progress = _progress_factory(lead)
  t0 = time.time()
  ref = adm_eval.read_batch(args.ref, extractor, params, reference=True, cache_path=cache,
                            progress=progress, log=log)
  t_ref = time.time()
  samples = adm_eval.read_batch(args.samples, extractor, params, reference=False,
                                progress=progress, log=log)
  t_samples = time.time()
  results = adm_eval.metrics(samples, ref) if lead else None
  t_end = time.time()
  if not lead:
    return 0
  log(format_table(results))
  report = {
      **results,
      "num_samples": samples.num_images, "num_reference": ref.num_images,
      "reference": str(args.ref), "reference_statistics": "stored" if ref.stored_statistics
      else "computed", "samples": str(args.samples), "inception_weights": str(weights_path),
      "precision_setting": args.precision, "meta": meta, "warnings": warnings,
      "seconds": {"reference": round(t_ref - t0, 2), "samples": round(t_samples - t_ref, 2),
                  "metrics": round(t_end - t_samples, 2)},
      "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
  }
  out = pathlib.Path(args.out) if args.out else pathlib.Path(args.samples).with_suffix(
      ".eval.json")
  out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
  log(f"wrote {out}")
  return 0


def main(argv=None) -> int:
  return errors.run_cli(PROG, _main, argv)


if __name__ == "__main__":
  sys.exit(main())
