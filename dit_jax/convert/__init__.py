"""Official DiT weights <-> Flax parameters.

* `official`: the pure numpy mapping between an official `state_dict` and our params tree
  (`state_dict_to_params`, `params_to_state_dict`).
* `io`: files (`.pt` via `torch.load(weights_only=True)`, `.safetensors`, `.npz`; Flax msgpack
  params) and the one-call `import_official` / `export_official`.
* `python -m dit_jax.convert {import,export,inspect} ...`: the command line (see `__main__`).
"""
from dit_jax.convert.io import (abstract_params, build_model, check_params, export_official,
                                import_official, load_params, load_state_dict, save_params,
                                save_state_dict)
from dit_jax.convert.official import params_to_state_dict, state_dict_to_params

__all__ = [
    "abstract_params", "build_model", "check_params", "export_official", "import_official",
    "load_params", "load_state_dict", "params_to_state_dict", "save_params", "save_state_dict",
    "state_dict_to_params",
]
