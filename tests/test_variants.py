"""Variant registry: names, tiny test configs, and the exact parameter count of every variant.

Counts are those of the official `models.py` (tests/data/param_counts.json), computed here from
abstract shapes only (`jax.eval_shape`), so no XL model is ever allocated.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.models import DiT, variants

SIZES = ("S", "B", "L", "XL")
PATCHES = (2, 4, 8)
ALL_OFFICIAL = sorted(f"DiT-{s}/{p}" for s in SIZES for p in PATCHES)


@pytest.fixture(scope="module")
def counts(data_dir):
  return json.loads((data_dir / "param_counts.json").read_text())["counts"]


def test_registry_and_json_cover_all_official_variants(counts):
  assert sorted(variants.OFFICIAL_NAMES) == ALL_OFFICIAL
  assert set(ALL_OFFICIAL) <= set(variants.NAMES)
  assert sorted(counts) == sorted(f"{n}@{s}" for n in ALL_OFFICIAL for s in (32, 64))
  untested = set(variants.NAMES) - set(ALL_OFFICIAL) - {"tiny-A", "tiny-B"}
  assert not untested, f"variants without a test: {untested}"


@pytest.mark.parametrize("name", ALL_OFFICIAL)
def test_param_count(name, counts):
  for input_size in (32, 64):
    model = variants.build(name, input_size=input_size, num_classes=1000, learn_sigma=True)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, input_size, input_size, 4), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.int32),
                            jax.ShapeDtypeStruct((1,), jnp.int32))
    trainable = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(shapes["params"]))
    want = counts[f"{name}@{input_size}"]
    assert trainable == want["trainable"]
    assert trainable + model.pos_embed().size == want["total_including_pos_embed"]


def test_name_forms():
  xl2 = variants.parse("DiT-XL/2")
  assert xl2 == variants.parse("XL/2") == variants.parse("DiT-XL_2")
  assert xl2 == dict(patch_size=2, mlp_ratio=4.0, hidden_size=1152, depth=28, num_heads=16)
  assert variants.parse("S/8") == dict(patch_size=8, mlp_ratio=4.0, hidden_size=384, depth=12,
                                       num_heads=6)
  assert variants.canonical_name("DiT-B_4") == "DiT-B/4"
  model = variants.build("B/4", input_size=64, num_classes=10, dtype="bfloat16")
  assert isinstance(model, DiT)
  assert (model.hidden_size, model.patch_size, model.input_size, model.num_classes,
          model.dtype) == (768, 4, 64, 10, "bfloat16")


@pytest.mark.parametrize("name, ref", [("tiny-A", "ref_a"), ("tiny-B", "ref_b")])
def test_tiny_variants_are_the_reference_configs(name, ref, request):
  cfg = json.loads(str(request.getfixturevalue(ref)["meta/config_json"]))
  assert variants.parse(name) == cfg


@pytest.mark.parametrize("bad", ["DiT-XXL/2", "XL/3", "XL", "DiT-XL-2", "tiny-C", ""])
def test_unknown_variant_lists_known_names(bad):
  with pytest.raises(ValueError, match="unknown DiT variant") as e:
    variants.parse(bad)
  assert "DiT-XL/2" in str(e.value) and "tiny-A" in str(e.value)


def test_bad_overrides():
  with pytest.raises(ValueError, match="unknown DiT field"):
    variants.build("XL/2", hiden_size=3)
  with pytest.raises(ValueError, match="input_size=30 is not divisible by patch_size=4"):
    variants.build("DiT-S/4", input_size=30)
