"""`python -m dit_jax.evaluation` end to end, and its features sharded over 8 devices.

The full Inception-v3 with deterministic random weights (`random_state_dict(0)`, the
weights of tests/test_inception.py's parity vectors), but resizing to 75 x 75 (the smallest
input the network takes) instead of 299 to keep the CPU tests fast; the 299 path is what
test_inception.py checks against torch-fidelity.
"""
import json
import zipfile

import jax
import numpy as np
import pytest

from conftest import load_config, rel_err
from dit_jax import sharding, train
from dit_jax.evaluation import __main__ as cli
from dit_jax.evaluation import adm_eval, adm_metrics, features, in_training, inception
from dit_jax.evaluation import inception_weights, npz_images

SMALL = 75


class SmallPool(inception.InceptionV3):
  """The network with its pool features cut to 64 values, for the command and hook tests:
  scipy's sqrtm of a 2048 x 2048 matrix takes about a minute of CPU here, and every FID takes
  one. test_inception.py and the 8-device test check the real 2048."""

  def __call__(self, images):
    out = super().__call__(images)
    return {**out, "pool": out["pool"][:, :64]}


@pytest.fixture(scope="module")
def state_dict():
  return inception_weights.random_state_dict(0)


@pytest.fixture(scope="module")
def params(state_dict):
  return inception_weights.params_from_state_dict(state_dict)


def _images(seed, n, size=32):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_features_on_8_devices_equal_one_device(params):
  # 64 images: one batch of 8 per device on 8 devices; on one device batches of 48, the second
  # with 32 padding rows (which must be dropped without touching the real ones).
  assert jax.device_count() == 8
  model = inception.InceptionV3(resize_to=SMALL)
  images = _images(0, 64)
  out = {}
  for n, per_device in ((8, 8), (1, 48)):
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:n])
    ex = features.FeatureExtractor(mesh, model, per_device_batch=per_device)
    out[n] = ex(ex.replicate(params), images)
  for k in features.OUTPUTS:
    assert out[8][k].shape[0] == 64 and out[1][k].shape[0] == 64
    assert rel_err(out[8][k], out[1][k]) < 1e-5, k
  ref, sam = {n: out[n]["pool"][:32] for n in out}, {n: out[n]["pool"][32:] for n in out}
  for n in out:  # The metrics of the two feature sets agree.
    out[n]["pr"] = adm_metrics.precision_recall(ref[n], sam[n])
    out[n]["is"] = adm_metrics.inception_score(out[n]["softmax"])
    out[n]["fid"] = adm_metrics.fid_from_statistics(  # 64 dims: see SmallPool.
        *adm_metrics.statistics(ref[n][:, :64]), *adm_metrics.statistics(sam[n][:, :64]))
  assert out[8]["pr"] == out[1]["pr"]
  assert out[8]["is"] == pytest.approx(out[1]["is"], rel=1e-6)
  assert out[8]["fid"] == pytest.approx(out[1]["fid"], rel=1e-5)


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def _run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_command_end_to_end(tmp_path, capsys, monkeypatch, state_dict):
  monkeypatch.setattr(cli, "build_model",
                      lambda precision: SmallPool(resize_to=SMALL, precision=precision))
  weights = tmp_path / "inception.npz"
  np.savez(weights, **state_dict)
  ref_images = _images(1, 12)
  ref = _write_npz(tmp_path / "ref.npz", arr_0=ref_images)
  meta = {"noise": "centered", "seed": 0, "num_samples": 8}
  samples = _write_npz(tmp_path / "samples.npz", arr_0=_images(2, 8) // 2,  # Darker.
                       arr_1=np.zeros(8, np.int32), dit_jax_meta=np.array(json.dumps(meta)))
  common = ("--inception-weights", weights, "--per-device-batch", 1)  # Batches of 8.

  code, out, err = _run(capsys, "--ref", ref, "--samples", samples, *common)
  assert code == 0, err
  assert "tied noise (noise='centered')" in err and "WARNING" in err
  assert '"noise": "centered"' in out and "FID" in out and "cached in" in out
  report = json.loads((tmp_path / "samples.eval.json").read_text())
  assert report["num_samples"] == 8 and report["num_reference"] == 12
  assert report["reference_statistics"] == "computed" and report["warnings"]
  for key in ("inception_score", "fid", "sfid", "precision", "recall"):
    assert np.isfinite(report[key]), key
  assert report["fid"] > 0.01 and report["sfid"] > 0.01, report  # Self: < 1e-6 below.

  # ADM's stored-statistics path: the reference with mu/sigma/mu_s/sigma_s (here those of its
  # own images, from the cache) gives the same numbers as computing them from the images.
  with np.load(tmp_path / "ref.inception_features.npz") as z:
    stats = {k: z[k] for k in adm_eval.STAT_KEYS}
    assert z["pool"].shape == (12, 64) and stats["mu_s"].shape == (3 * 3 * 7,)
  stored = _write_npz(tmp_path / "ref_stored.npz", arr_0=ref_images, **stats)
  code, out, err = _run(capsys, "--ref", stored, "--samples", samples, "--out",
                        tmp_path / "stored.json", "--no-ref-cache", *common)
  assert code == 0, err
  report2 = json.loads((tmp_path / "stored.json").read_text())
  assert report2["reference_statistics"] == "stored"
  for key in ("inception_score", "fid", "sfid", "precision", "recall"):
    assert report2[key] == pytest.approx(report[key], rel=1e-9), key

  # The README's first check in miniature: a reference file with stored statistics as the
  # samples (whose statistics are computed from arr_0) gives FID and sFID 0, precision and
  # recall 1. The first reference's features come from the cache.
  code, out, err = _run(capsys, "--ref", ref, "--samples", stored, "--out",
                        tmp_path / "self.json", *common)
  assert code == 0, err
  assert "read from the cache" in out
  self_report = json.loads((tmp_path / "self.json").read_text())
  assert abs(self_report["fid"]) < 1e-6 and abs(self_report["sfid"]) < 1e-6
  assert self_report["precision"] == 1.0 and self_report["recall"] == 1.0


def test_command_errors_are_one_line(tmp_path, capsys):
  ref = _write_npz(tmp_path / "ref.npz", arr_0=_images(1, 8))
  code, _, err = _run(capsys, "--ref", ref, "--samples", ref, "--inception-weights",
                      tmp_path / "nope")
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert "weights-inception-2015-12-05-6726825d.pth" in err
  code, _, err = _run(capsys, "--ref", ref, "--samples", tmp_path / "missing.npz")
  assert code == 2 and "--samples" in err and "no such file" in err
  gray = _write_npz(tmp_path / "gray.npz", arr_0=np.zeros((8, 8, 8, 1), np.uint8))
  with pytest.raises(Exception, match=r"uint8 images \(N, H, W, 3\)"):
    npz_images.check_images(npz_images.open_array(gray, "arr_0"), gray)


def test_npz_reader_memory_maps_stored_members(tmp_path):
  images = _images(3, 5, size=7)
  plain = _write_npz(tmp_path / "plain.npz", arr_0=images)
  # A zip64 member streamed the way sample_files writes large files.
  big = tmp_path / "zip64.npz"
  with zipfile.ZipFile(big, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    with zf.open("arr_0.npy", "w", force_zip64=True) as fp:
      np.lib.format.write_array(fp, images, allow_pickle=False)
  compressed = tmp_path / "compressed.npz"
  np.savez_compressed(compressed, arr_0=images)
  for path, mapped in ((plain, True), (big, True), (compressed, False)):
    arr = npz_images.open_array(path, "arr_0")
    assert isinstance(arr, np.memmap) == mapped
    np.testing.assert_array_equal(arr[1:4], images[1:4])


def test_weights_importer_checks_keys(state_dict):
  sd = dict(state_dict)
  sd["Mixed_6d.branch1x1.bn.num_batches_tracked"] = np.zeros(())  # Skipped.
  params = inception_weights.params_from_state_dict(sd)
  k = params["Mixed_6d"]["branch1x1"]["conv"]["kernel"]
  np.testing.assert_array_equal(k, state_dict["Mixed_6d.branch1x1.conv.weight"].transpose(
      2, 3, 1, 0))
  np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
  missing = {k: v for k, v in sd.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
  with pytest.raises(Exception, match="missing key 'Mixed_7c.branch_pool.bn.running_var'"):
    inception_weights.params_from_state_dict(missing)
  with pytest.raises(Exception, match="unexpected keys.*AuxLogits"):
    inception_weights.params_from_state_dict({**sd, "AuxLogits.fc.weight": np.zeros((2, 2))})
  with pytest.raises(Exception, match=r"'fc.weight' has shape \(1000, 2048\)"):
    inception_weights.params_from_state_dict({**sd, "fc.weight": np.zeros((1000, 2048))})


def test_torch_files_load_with_weights_only(tmp_path, state_dict):
  torch = pytest.importorskip("torch")
  small = {k: v for k, v in state_dict.items()}
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save({k: torch.from_numpy(v) for k, v in small.items()}, path,
             _use_new_zipfile_serialization=False)  # The 2019 files predate the zip format.
  params = inception_weights.load(tmp_path)  # A directory: found by its published name.
  np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["bn"]["var"],
                                state_dict["Conv2d_1a_3x3.bn.running_var"])


def test_training_fid_hook(tmp_path, state_dict):
  weights = tmp_path / "inception.npz"
  np.savez(weights, **state_dict)
  ref_images = _images(1, 12)
  ref = _write_npz(tmp_path / "ref.npz", arr_0=ref_images)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
  assert in_training.create(load_config(), mesh, 10) is None  # Off by default.
  config = load_config(eval__fid_every_steps=2, eval__fid_num_samples=12, eval__fid_ref=ref,
                       eval__inception_weights=str(weights))
  hook = in_training.create(config, mesh, 10, model=SmallPool(resize_to=SMALL),
                            per_device_batch=1)
  assert [s for s in range(1, 7) if hook.due(s)] == [2, 4, 6]
  draws = []

  def draw(labels, seed):
    draws.append((labels, seed))
    return ref_images if len(draws) == 1 else ref_images // 2

  assert abs(hook(draw)) < 1e-6  # The reference's own images.
  assert hook(draw) > 0.01
  labels, seed = draws[0]
  assert labels.shape == (12,) and labels.min() >= 0 and labels.max() < 10 and seed == 0
  np.testing.assert_array_equal(draws[1][0], labels)  # The same labels every evaluation.


def test_train_logs_eval_fid(tmp_path, monkeypatch):
  # The wiring in train.py: the hook runs on its steps with the run's sampler and the EMA
  # parameters, and eval/fid reaches the metric writer.
  config = load_config(eval__fid_every_steps=2)
  config.total_steps = 2
  config.logging.sample_every_steps = 0
  config.sample.final_num_samples_per_class = 0
  calls, written = [], []

  class FakeHook:
    num_samples = 4

    def due(self, step):
      return step % 2 == 0

    def __call__(self, draw):
      images = draw(np.arange(4, dtype=np.int32), 0)
      calls.append(images)
      return 1.25

  monkeypatch.setattr(train.in_training, "create", lambda *a, **k: FakeHook())
  original = train.metrics_lib.MetricWriter.write_scalars
  monkeypatch.setattr(train.metrics_lib.MetricWriter, "write_scalars",
                      lambda self, step, scalars: (written.append((step, dict(scalars))),
                                                   original(self, step, scalars)))
  train.train_and_evaluate(config, str(tmp_path))
  assert len(calls) == 1 and calls[0].shape == (4, 8, 8, 1) and calls[0].dtype == np.uint8
  assert (2, {"eval/fid": 1.25}) in written
