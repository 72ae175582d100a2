"""gs:// paths: what they need installed, checked before a run starts.

A `gs://` workdir or data directory goes through three clients: etils.epath (directories,
configs, grids, sample files, Orbax's directory operations) through `gcsfs`; tensorboardX's
event files through `google-cloud-storage`; Orbax's arrays through tensorstore, which speaks
GCS itself. The first two come with the `gcs` install extra (`pip install -e ".[gcs]"`;
launch/tpu_install.sh installs it). Without them a run would fail late (the TensorBoard writer
at its first event), so `check_paths` refuses at once with one line naming the extra.
"""
from __future__ import annotations

import importlib.util
from typing import Mapping

from dit_jax import errors

# Module -> the pip package the `gcs` extra installs for it.
GCS_MODULES = {"gcsfs": "gcsfs", "google.cloud.storage": "google-cloud-storage"}


def _missing_modules() -> list[str]:
  missing = []
  for module, package in GCS_MODULES.items():
    try:
      found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # A parent package (google.cloud) is absent.
      found = False
    if not found:
      missing.append(package)
  return missing


def check_paths(paths: Mapping[str, str | None]) -> None:
  """Raises a UserError if a `gs://` path is given and the `gcs` extra is not installed.

  paths: {what the user set (a flag or config field): its value (None: unset)}.
  """
  remote = {name: str(p) for name, p in paths.items() if p and str(p).startswith("gs://")}
  if not remote:
    return
  missing = _missing_modules()
  if missing:
    name, path = next(iter(remote.items()))
    raise errors.UserError(
        f"{name}={path}: gs:// paths need the `gcs` extra, which is not installed (missing "
        f"{', '.join(missing)}): pip install -e '.[gcs]'")
