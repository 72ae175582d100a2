"""Official state_dict <-> Flax params: the naming rule, array layouts, round trips, errors."""
import jax
import numpy as np
import pytest

from dit_jax.convert import official
from dit_jax.models import variants


def _state_dict(ref):
  return {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}


def _expected(name):
  model = variants.build(name)
  x = jax.ShapeDtypeStruct((1, model.input_size, model.input_size, model.in_channels),
                           np.float32)
  i = jax.ShapeDtypeStruct((1,), np.int32)
  return model, jax.eval_shape(model.init, jax.random.key(0), x, i, i)["params"]


@pytest.mark.parametrize("key, path", [
    ("blocks.3.adaLN_modulation.1.weight", ("blocks_3", "adaLN_modulation_1", "kernel")),
    ("blocks.12.attn.qkv.bias", ("blocks_12", "attn", "qkv", "bias")),
    ("t_embedder.mlp.0.weight", ("t_embedder", "mlp_0", "kernel")),
    ("x_embedder.proj.weight", ("x_embedder", "proj", "kernel")),
    ("y_embedder.embedding_table.weight", ("y_embedder", "embedding_table", "embedding")),
    ("final_layer.adaLN_modulation.1.bias", ("final_layer", "adaLN_modulation_1", "bias")),
    ("final_layer.norm_final.weight", ("final_layer", "norm_final", "scale")),
])
def test_naming_rule(key, path):
  assert official.official_key_to_path(key) == path
  assert official.path_to_official_key(path) == key


@pytest.mark.parametrize("which, name", [("ref_a", "tiny-A"), ("ref_b", "tiny-B")])
def test_round_trip_and_layouts(which, name, request):
  ref = request.getfixturevalue(which)
  sd = _state_dict(ref)
  model, expected = _expected(name)
  params = official.state_dict_to_params(sd, expected=expected)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  np.testing.assert_array_equal(params["x_embedder"]["proj"]["kernel"],
                                sd["x_embedder.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"],
                                sd["blocks.0.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["y_embedder"]["embedding_table"]["embedding"],
                                sd["y_embedder.embedding_table.weight"])
  back = official.params_to_state_dict(params, pos_embed=model.pos_embed())
  assert list(back)[0] == "pos_embed"
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype == np.float32, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert "pos_embed" not in official.params_to_state_dict(params, pos_embed=None)


def test_fresh_params_export_with_official_keys_and_shapes(ref_a):
  model, expected = _expected("tiny-A")
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), expected)
  sd = official.params_to_state_dict(params, pos_embed=model.pos_embed()[None])
  ref = _state_dict(ref_a)
  assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.items()}


def test_errors_list_every_problem(ref_a):
  _, expected = _expected("tiny-A")
  sd = dict(_state_dict(ref_a))
  del sd["blocks.1.mlp.fc1.bias"]
  del sd["t_embedder.mlp.2.weight"]
  sd["blocks.2.attn.qkv.weight"] = np.zeros((192, 64), np.float32)
  sd["final_layer.linear.weight"] = np.zeros((31, 64), np.float32)
  sd["y_embedder.embedding_table.weight"] = np.zeros((10, 64), np.float32)
  with pytest.raises(ValueError) as e:
    official.state_dict_to_params(sd, expected=expected)
  msg = str(e.value)
  for part in ["missing keys (2)", "blocks.1.mlp.fc1.bias", "t_embedder.mlp.2.weight",
               "unexpected keys (1)", "blocks.2.attn.qkv.weight",
               "mis-shaped keys (2)", "final_layer.linear.weight: got (31, 64), expected (32, 64)",
               "y_embedder.embedding_table.weight: got (10, 64), expected (11, 64)"]:
    assert part in msg, part


def test_bad_pos_embed_and_bad_names(ref_a):
  sd = dict(_state_dict(ref_a))
  sd["pos_embed"] = sd["pos_embed"] + 1e-3
  sd["blocks.0.norm1.running_mean"] = np.zeros(3)
  with pytest.raises(ValueError) as e:
    official.state_dict_to_params(sd)
  assert "pos_embed: differs from the fixed 2-D sin-cos table" in str(e.value)
  assert "running_mean" in str(e.value)
  with pytest.raises(ValueError, match="unknown leaf"):
    official.path_to_official_key(("blocks_0", "attn", "qkv", "weights"))
