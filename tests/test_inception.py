"""The Flax FID Inception-v3 against torch-fidelity 0.4.0's TF-exact port (random weights).

Vectors: tests/data/inception_vectors.npz, written by tests/data/make_inception_vectors.py
(see its docstring to rerun). Weights and images are regenerated here from their seeds.
"""
import importlib.util
import json

import jax
import numpy as np
import pytest

from conftest import DATA_DIR, rel_err
from dit_jax.evaluation import inception, inception_weights

# The generator script's image draws and hashes (it imports torch only when run).
_spec = importlib.util.spec_from_file_location("make_inception_vectors",
                                               DATA_DIR / "make_inception_vectors.py")
mkv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mkv)


@pytest.fixture(scope="module")
def vectors(data_dir):
  with np.load(data_dir / "inception_vectors.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def params(vectors):
  state_dict = inception_weights.random_state_dict(int(vectors["meta/weights_seed"]))
  assert mkv.weights_sha256(state_dict) == str(vectors["meta/weights_sha256"]), (
      "random_state_dict no longer draws the weights the vectors were made with")
  return inception_weights.params_from_state_dict(state_dict)


@pytest.mark.parametrize("size", [256, 512])
def test_resize_matches_tf1_bilinear(vectors, size):
  images = mkv.images(size)
  assert mkv.sha256([images]) == str(vectors[f"{size}/images_sha256"])
  x = images[:1, :, :, :1].astype(np.float32)
  got = np.asarray(jax.jit(inception.resize_bilinear_tf1, static_argnums=1)(x, (299, 299)))
  want = vectors[f"{size}/resize_299_channel0"]
  assert rel_err(got[0, :, :, 0], want) < 1e-6
  # Not what half-pixel-centred resizing (jax.image.resize) gives.
  other = np.asarray(jax.image.resize(x, (1, 299, 299, 1), "bilinear", antialias=False))
  assert rel_err(other[0, :, :, 0], want) > 1e-2


def test_features_match_torch_fidelity(vectors, params):
  assert json.loads(str(vectors["meta/images_json"])) == {str(k): list(v)
                                                          for k, v in mkv.IMAGES.items()}
  # Both sizes through one compiled network: resized first (the module skips its resize
  # for 299 x 299 input, so this is the same computation as feeding the uint8 images).
  resize = jax.jit(inception.resize_bilinear_tf1, static_argnums=1)
  sizes = list(mkv.IMAGES)
  x = np.concatenate([resize(mkv.images(s).astype(np.float32), (299, 299)) for s in sizes])
  model = inception.InceptionV3()
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  assert out["spatial"].shape == (len(x), 17 * 17 * 7)
  for ours, theirs in (("pool", "pool"), ("spatial", "spatial"), ("logits", "logits_unbiased")):
    want = np.concatenate([vectors[f"{s}/{theirs}"] for s in sizes])
    err = rel_err(out[ours], want)
    assert err < 1e-5, (ours, err)
