"""Hugging Face checkpoints in and out (FP8 block-quantised weights included).

    from mimo_jax.convert import hf
    model, params = hf.load(hf_dir)                   # also mimo_jax.convert.load_hf
    hf.save(model.config, params, out_dir)            # also mimo_jax.convert.save_hf

Modules: `hf` (load / save), `hf_config` (config.json <-> ModelConfig), `hf_names` (tensor names
<-> parameter paths), `safetensors_io` (lazy reading, sharded writing), `weights`, `fp8`.
"""

from mimo_jax.convert import hf
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.hf import load as load_hf
from mimo_jax.convert.hf import read_config
from mimo_jax.convert.hf import save as save_hf

__all__ = ["CheckpointError", "hf", "load_hf", "read_config", "save_hf"]
