"""A local GCS emulator for the gs:// tests (gcp-storage-emulator, bound to 127.0.0.1 only).

Every gs:// client of a training run reaches it through environment variables:
google-cloud-storage (tensorboardX) and gcsfs (etils.epath) through `STORAGE_EMULATOR_HOST`,
tensorstore (Orbax's array writer) through `TENSORSTORE_GCS_HTTP_URL` with the test token
`GOOGLE_AUTH_TOKEN_FOR_TESTING`.

Two fixes to the emulator (2026.7.19), both applied by `running`:
- its media downloads omit the `x-goog-generation` header that real GCS sends with every object
  read, and tensorstore refuses a read without it ("Malformed StorageGeneration");
- it lacks the objects.move API (`POST .../o/<src>/moveTo/o/<dst>`), which gcsfs tries first for
  every object of a rename (etils.epath's `rename`, e.g. checkpointing.move_aside) and retries
  6 times with backoff on the emulator's 501 (~7 s per object) before copying and deleting;
  served here as a copy and a delete, what real GCS does in one call.
The emulator ignores `ifGenerationMatch` preconditions, so it serves one writer per object (as
every test here is) but cannot test concurrent-writer races.
"""
from __future__ import annotations

import contextlib
from http import HTTPStatus
import os
import re
import socket

ENV_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
            "GOOGLE_CLOUD_PROJECT", "NO_GCE_CHECK", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _patch_generation_header() -> None:
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  if getattr(objects.download, "_adds_generation", False):
    return
  original = objects.download

  def download(request, response, storage, *args, **kwargs):
    original(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  download._adds_generation = True  # pylint: disable=protected-access
  objects.download = download  # objects.get calls it for alt=media.
  for _, handlers in server.HANDLERS:
    for method, fn in list(handlers.items()):
      if fn is original:
        handlers[method] = download


def _move(request, response, storage, *args, **kwargs):
  """objects.move within one bucket: a copy, then the source deleted; 404 if it is absent."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  bucket = request.params["bucket_name"]
  try:
    moved = objects._copy(request.base_url, storage, bucket, request.params["object_id"],  # pylint: disable=protected-access
                          bucket, request.params["dest_object_id"])
  except NotFound:  # gcsfs moves the implied directories too, and ignores their 404.
    response.status = HTTPStatus.NOT_FOUND
    return
  objects._delete(storage, bucket, request.params["object_id"])  # pylint: disable=protected-access
  response.json(moved)


def _add_move() -> None:
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  if any(_move in handlers.values() for _, handlers in server.HANDLERS):
    return
  api = re.escape(server.settings.API_ENDPOINT)
  route = (rf"^{api}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
           rf"(?P<dest_object_id>.*[^/]+)$", {server.POST: _move})
  server.HANDLERS = (route, *server.HANDLERS)  # Before the generic object routes.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str):
  """Starts an in-memory emulator with `bucket`; yields the env vars that point clients to it."""
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  _patch_generation_header()
  _add_move()
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test", "GOOGLE_CLOUD_PROJECT": "test",
         # No credential look-ups: no GCE metadata server probe, no zonal-bucket check.
         "NO_GCE_CHECK": "true", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  try:
    yield env
  finally:
    server.stop()


def blob_names(env: dict, bucket: str) -> list[str]:
  """Every object name in `bucket`, read with google-cloud-storage (no listing cache)."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  saved = {k: os.environ.get(k) for k in ENV_VARS}
  os.environ.update(env)
  try:
    client = storage.Client(project=env["GOOGLE_CLOUD_PROJECT"])
    return sorted(b.name for b in client.list_blobs(bucket))
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
