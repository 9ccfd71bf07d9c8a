"""An FP8 export read by transformers: the same logits as `hf.load` of the same files.

transformers' dequantiser takes the block size from the scale grid (rows // grid rows), so it
reads only weights made of whole blocks; the full model's dims are multiples of 128, and here a
block of 8 divides every dim of the tiny reference config.
"""

import jax.numpy as jnp
import numpy as np
import torch
from transformers import MiMoV2FlashForCausalLM

import hf_reference
from mimo_jax.convert import hf

BLOCK = (8, 8)


def test_transformers_reads_the_fp8_export(tmp_path):
    source, exported = str(tmp_path / "source"), str(tmp_path / "fp8")
    hf_reference.random_model(hf_reference.tiny_config(96), source)
    model, params = hf.load(source)
    hf.save(model.config, params, exported, fp8_block=BLOCK)
    theirs = MiMoV2FlashForCausalLM.from_pretrained(exported).float().eval()
    ours_model, ours_params = hf.load(exported, param_dtype="float32", dtype="float32")
    tokens = np.random.default_rng(0).integers(0, 96, (2, 40))
    with torch.no_grad():
        want = theirs(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(ours_model.apply({"params": ours_params}, jnp.asarray(tokens, jnp.int32))
                     .logits)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # The weights really went through FP8: the logits moved away from the unquantised model's.
    unquantised = np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32))
                             .logits)
    assert np.abs(got - unquantised).max() > 1e-3
