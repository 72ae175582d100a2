"""sample_files: the streamed ADM-format writer, read back by np.load and by ADM's zip reader."""
import json
import zipfile

import numpy as np
import pytest

from dit_jax import sample_files

META = {k: None for k in sample_files.META_KEYS} | {"seed": 3, "cfg_scale": 1.5,
                                                     "checkpoint": "x.pt"}


def _chunks(images, labels, size):
  for i in range(0, len(images), size):
    yield images[i:i + size], labels[i:i + size]


def _adm_read_arr_0(path):
  """What guided-diffusion's evaluator does (`open_npz_array` / `NpzArrayReader`): open the
  member `arr_0.npy` of the zip, parse the .npy header, read the raw bytes."""
  with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
    version = np.lib.format.read_magic(f)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}[version]
    shape, fortran, dtype = read(f)
    assert not fortran
    data = f.read()
  return np.frombuffer(data, dtype).reshape(shape)


def test_streamed_file_reads_back_everywhere(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (13, 5, 4, 3), dtype=np.uint8)
  labels = rng.integers(0, 1000, (13,)).astype(np.int32)
  path = tmp_path / "s.npz"
  sample_files.write(path, _chunks(images, labels, 4), num_samples=13, image_shape=(5, 4, 3),
                     meta=META)
  with np.load(path, allow_pickle=False) as z:
    assert z.files == ["arr_0", "arr_1", "dit_jax_meta"]
    np.testing.assert_array_equal(z["arr_0"], images)
    np.testing.assert_array_equal(z["arr_1"], labels)
    assert z["arr_0"].dtype == np.uint8 and z["arr_1"].dtype == np.int32
    assert z["dit_jax_meta"].shape == () and z["dit_jax_meta"].dtype.kind == "U"
  np.testing.assert_array_equal(_adm_read_arr_0(path), images)
  assert sample_files.read_meta(path) == json.loads(json.dumps(META))
  got_images, got_labels = sample_files.load(path)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert not (tmp_path / "s.npz.tmp").exists()
  # The in-memory form writes the same bytes.
  sample_files.save(tmp_path / "t.npz", images, labels, META)
  assert (tmp_path / "t.npz").read_bytes() == path.read_bytes()


def test_official_file_has_no_meta(tmp_path):
  np.savez(tmp_path / "o.npz", np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))
  assert sample_files.read_meta(tmp_path / "o.npz") is None


def test_wrong_count_or_meta_leaves_no_file(tmp_path):
  images = np.zeros((4, 2, 2, 3), np.uint8)
  labels = np.zeros(4, np.int32)
  path = tmp_path / "s.npz"
  with pytest.raises(ValueError, match="expected num_samples=5"):
    sample_files.write(path, _chunks(images, labels, 2), num_samples=5, image_shape=(2, 2, 3),
                       meta=META)
  with pytest.raises(ValueError, match="more than num_samples=3"):
    sample_files.write(path, _chunks(images, labels, 2), num_samples=3, image_shape=(2, 2, 3),
                       meta=META)
  with pytest.raises(ValueError, match="expected uint8"):
    sample_files.save(path, images.astype(np.float32), labels, META)
  with pytest.raises(ValueError, match="missing"):
    sample_files.save(path, images, labels, {"seed": 0})
  assert not path.exists()
