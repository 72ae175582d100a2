"""Tests of dit_jax.convert.io and the `python -m dit_jax.convert` command line.

Reference parameters are `param/*` of tests/data/model_tiny.npz (config A) and
model_tiny_p4.npz (config B); see tests/data/README.md.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import rel_err
from dit_jax.convert import io

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _state_dict(ref):
  return {k[len("param/"):]: ref[k] for k in ref if k.startswith("param/")}


def _config(ref):
  return json.loads(str(ref["meta/config_json"]))


def _model_flags(cfg):
  return ["--input-size", str(cfg["input_size"]), "--patch-size", str(cfg["patch_size"]),
          "--hidden-size", str(cfg["hidden_size"]), "--depth", str(cfg["depth"]),
          "--num-heads", str(cfg["num_heads"]), "--num-classes", str(cfg["num_classes"]),
          "--learn-sigma", str(cfg["learn_sigma"]).lower()]


def _torch_save(sd, path):
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "dit_jax.convert", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def _forward(params, cfg, ref):
  model = io.build_model(cfg)
  x = np.asarray(ref["fwd/x"]).transpose(0, 2, 3, 1)
  out = model.apply({"params": params}, x, ref["fwd/t"], ref["fwd/y"])
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_cli_import_pt_reproduces_forward_and_exports_back(tmp_path, ref_a):
  cfg, sd = _config(ref_a), _state_dict(ref_a)
  pt, msgpack, st = tmp_path / "dit.pt", tmp_path / "dit.msgpack", tmp_path / "back.safetensors"
  _torch_save(sd, pt)

  r = _cli("import", *_model_flags(cfg), pt, msgpack)
  assert r.returncode == 0, r.stderr
  params = io.load_params(msgpack)
  err = rel_err(_forward(params, cfg, ref_a), ref_a["fwd/out"])
  print(f"forward of CLI-imported .pt: rel_err {err:.2e}")
  assert err <= 1e-5

  r = _cli("export", *_model_flags(cfg), msgpack, st)
  assert r.returncode == 0, r.stderr
  back = io.load_state_dict(st)
  assert sorted(back) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("ref_name", ["ref_a", "ref_b"])
def test_round_trip_state_dict_flax_files(tmp_path, request, ref_name):
  ref = request.getfixturevalue(ref_name)
  cfg, sd = _config(ref), _state_dict(ref)
  io.save_state_dict(sd, tmp_path / "in.npz")
  params = io.import_official(tmp_path / "in.npz", cfg)
  io.save_params(params, tmp_path / "p.msgpack")
  params2 = io.load_params(tmp_path / "p.msgpack", expected=io.abstract_params(io.build_model(cfg)))
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  for suffix in (".safetensors", ".pt"):
    out = tmp_path / f"out{suffix}"
    io.export_official(params2, out, model=cfg)
    back = io.load_state_dict(out)
    assert sorted(back) == sorted(sd), suffix
    for k in sd:
      assert back[k].dtype == sd[k].dtype, k
      np.testing.assert_array_equal(back[k], sd[k], err_msg=f"{suffix} {k}")


def test_training_checkpoint_model_and_ema(tmp_path, ref_a):
  sd = _state_dict(ref_a)
  ema = {k: v + 1.0 for k, v in sd.items()}
  ckpt = {
      "model": {k: torch.from_numpy(v.copy()) for k, v in sd.items()},
      "ema": {k: torch.from_numpy(v.copy()) for k, v in ema.items()},
      "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
      "args": argparse.Namespace(model="DiT-XL/2", image_size=256),  # as official train.py
  }
  path = tmp_path / "0001000.pt"
  torch.save(ckpt, path)
  got_ema = io.load_state_dict(path)  # which="ema" by default
  got_model = io.load_state_dict(path, which="model")
  k = "x_embedder.proj.weight"
  np.testing.assert_array_equal(got_ema[k], ema[k])
  np.testing.assert_array_equal(got_model[k], sd[k])
  with pytest.raises(ValueError, match=r"no entry 'foo'.*\['ema', 'model', 'opt'\]"):
    io.load_state_dict(path, which="foo")
  # The same grouping as key prefixes in a .safetensors file.
  io.save_state_dict({**{f"ema/{k}": v for k, v in ema.items()},
                      **{f"model/{k}": v for k, v in sd.items()}}, tmp_path / "c.safetensors")
  np.testing.assert_array_equal(io.load_state_dict(tmp_path / "c.safetensors", which="model")[k],
                                sd[k])
  with pytest.raises(ValueError, match=r"no entry 'x'.*\['ema', 'model'\]"):
    io.load_state_dict(tmp_path / "c.safetensors", which="x")


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "PWNED"
  path = tmp_path / "evil.pt"
  torch.save({"x_embedder.proj.weight": torch.zeros(2), "payload": _Evil(marker)}, path)
  with pytest.raises(ValueError, match=r"evil\.pt.*refused.*system"):
    io.load_state_dict(path)
  assert not marker.exists()
  # The command line: exit status 2, one message, no traceback.
  r = _cli("import", "--variant", "DiT-S/8", "--image-size", "256", path, tmp_path / "o.msgpack")
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert "refused" in r.stderr and "Traceback" not in r.stderr, r.stderr
  assert not marker.exists()
  assert not (tmp_path / "o.msgpack").exists()


def test_non_tensor_values_are_refused(tmp_path):
  path = tmp_path / "bad.pt"
  torch.save({"x_embedder.proj.weight": torch.zeros(2), "step": 3}, path)
  with pytest.raises(ValueError, match=r"bad\.pt.*'step' is a builtins\.int, not a tensor"):
    io.load_state_dict(path)
  torch.save([torch.zeros(2)], tmp_path / "list.pt")
  with pytest.raises(ValueError, match=r"list\.pt.*holds a list"):
    io.load_state_dict(tmp_path / "list.pt")
  np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(ValueError, match=r"obj\.npz"):
    io.load_state_dict(tmp_path / "obj.npz")
  with pytest.raises(ValueError, match=r"unknown state_dict file type '\.txt'"):
    (tmp_path / "a.txt").write_text("x")
    io.load_state_dict(tmp_path / "a.txt")


def test_missing_unexpected_misshaped_keys_in_one_error(tmp_path, ref_a):
  cfg, sd = _config(ref_a), dict(_state_dict(ref_a))
  del sd["blocks.1.mlp.fc2.bias"]
  sd["blocks.7.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
  sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:5]
  path = tmp_path / "bad.safetensors"
  io.save_state_dict(sd, path)
  with pytest.raises(ValueError) as e:
    io.import_official(path, cfg)
  msg = str(e.value)
  print(msg)
  for needle in ("bad.safetensors", "missing", "blocks.1.mlp.fc2.bias", "unexpected",
                 "blocks.7.attn.qkv.weight", "final_layer.linear.weight", "(5, 64)", "(32, 64)"):
    assert needle in msg, (needle, msg)


def test_flax_params_check_lists_paths(tmp_path, ref_a):
  cfg = _config(ref_a)
  expected = io.abstract_params(io.build_model(cfg))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), expected)
  params["blocks_0"]["mlp"]["fc1"]["kernel"] = np.zeros((1, 1), np.float32)
  params["extra"] = {"w": np.zeros(2, np.float32)}
  del params["final_layer"]["linear"]["bias"]
  io.save_params({"params": params}, tmp_path / "p.msgpack")
  with pytest.raises(ValueError) as e:
    io.load_params(tmp_path / "p.msgpack", expected=expected)
  msg = str(e.value)
  for needle in ("final_layer/linear/bias", "extra/w", "blocks_0/mlp/fc1/kernel: got (1, 1)"):
    assert needle in msg, (needle, msg)


def test_torch_missing_gives_install_hint(tmp_path, monkeypatch):
  path = tmp_path / "w.pt"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match=r'pip install "dit_jax\[torch\]"'):
    io.load_state_dict(path)


def test_cli_user_errors_exit_2(tmp_path):
  from dit_jax.convert.__main__ import main  # in-process: no jax start-up per case
  assert main(["import", "--variant", "DiT-S/8", "--image-size", "256",
               str(tmp_path / "nope.pt"), str(tmp_path / "o.msgpack")]) == 2
  assert main(["import", "--image-size", "256", str(tmp_path / "nope.pt"),
               str(tmp_path / "o.msgpack")]) == 2
  assert main(["import", "--variant", "DiT-S/8", "--image-size", "100",
               str(tmp_path / "nope.pt"), str(tmp_path / "o.msgpack")]) == 2
  with pytest.raises(SystemExit) as e:  # argparse's own errors are status 2 as well
    main(["import", "--variant", "DiT-S/8", "a.pt", "b.txt"])
  assert e.value.code == 2


def test_wrong_image_size_is_caught_by_pos_embed(tmp_path, ref_a):
  # pos_embed is the only tensor whose shape depends on the input size.
  cfg = dict(_config(ref_a), input_size=16)
  io.save_state_dict(_state_dict(ref_a), tmp_path / "a.safetensors")
  with pytest.raises(ValueError, match=r"pos_embed has shape \(1, 16, 64\), expected "
                     r"\(1, 64, 64\).*input_size=8"):
    io.import_official(tmp_path / "a.safetensors", cfg)


def test_cli_variant_name_in_process(tmp_path, ref_b):
  from dit_jax.convert.__main__ import main
  pt = tmp_path / "b.pth"
  _torch_save(_state_dict(ref_b), pt)
  assert main(["import", "--variant", "tiny-B", str(pt), str(tmp_path / "b.msgpack")]) == 0
  params = io.load_params(tmp_path / "b.msgpack")
  err = rel_err(_forward(params, "tiny-B", ref_b), ref_b["fwd/out"])
  assert err <= 1e-5, err
  assert main(["export", "--variant", "tiny-B", str(tmp_path / "b.msgpack"),
               str(tmp_path / "b.npz")]) == 0
  back = io.load_state_dict(tmp_path / "b.npz")
  for k, v in _state_dict(ref_b).items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
