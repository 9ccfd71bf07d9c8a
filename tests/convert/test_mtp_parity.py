"""MTP heads exported under `model.mtp.layers.{k}` against a reference built from transformers parts.

transformers has no MTP heads (it ignores `model.mtp.*`), so the reference assembles one from the
saved tensors as SGLang's MiMo-V2-Flash MTP layer does: h = eh_proj([enorm(emb(t_{i+k+1}));
hnorm(h_prev)]), one transformers sliding-window decoder layer with a dense MLP (pre_mlp_layernorm
as its post-attention norm), then final_layernorm and the shared LM head.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MiMoV2FlashForCausalLM
from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import (MiMoV2FlashDecoderLayer,
                                                                      MiMoV2FlashRMSNorm)

from mimo_jax.convert import hf

LENGTH = 24
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tiny_config, tiny_params, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tiny_mtp"))
    hf.save(tiny_config, tiny_params, directory)
    return directory


def _norm(weight, eps):
    norm = MiMoV2FlashRMSNorm(weight.shape[0], eps)
    norm.weight.data = weight
    return norm


def _reference_head(torch_model, tensors, k):
    """(block, enorm, hnorm, eh_proj weight, final norm) of MTP head k from the saved tensors."""
    config = copy.deepcopy(torch_model.config)
    config.mlp_layer_types = ["dense"] * config.num_hidden_layers  # the MTP block's FFN is dense
    swa_layer = config.layer_types.index("sliding_attention")
    block = MiMoV2FlashDecoderLayer(config, swa_layer).eval()
    prefix = f"model.mtp.layers.{k}."
    renames = {"self_attn.sinks": "self_attn.attention_sink_bias",
               "post_attention_layernorm.weight": "pre_mlp_layernorm.weight"}
    block.load_state_dict({name: tensors[prefix + renames.get(name, name)]
                           for name in block.state_dict()})
    eps = config.rms_norm_eps
    return (block, _norm(tensors[prefix + "enorm.weight"], eps),
            _norm(tensors[prefix + "hnorm.weight"], eps), tensors[prefix + "eh_proj.weight"],
            _norm(tensors[prefix + "final_layernorm.weight"], eps))


def test_mtp_heads_match_reference_and_transformers_loads_the_export(tiny_config, exported):
    from safetensors.torch import load_file
    tokens = np.random.default_rng(0).integers(0, tiny_config.vocab_size, (2, LENGTH))
    model, params = hf.load(exported)
    out = jax.jit(lambda p, t: model.apply({"params": p}, t, return_mtp=True))(
        params, jnp.asarray(tokens, jnp.int32))

    torch_model = MiMoV2FlashForCausalLM.from_pretrained(exported).eval()  # skips model.mtp.*
    tokens_t = torch.tensor(tokens)
    with torch.no_grad():
        main = torch_model(tokens_t).logits.numpy()
    np.testing.assert_allclose(np.asarray(out.logits), main, atol=TOL, rtol=0)

    tensors = load_file(f"{exported}/model.safetensors")
    window = torch_model.config.sliding_window
    q = torch.arange(LENGTH)[:, None]
    allowed = (q >= q.T) & (q - q.T < window)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    positions = torch.arange(LENGTH)[None]
    previous = torch.tensor(np.asarray(out.hidden))
    for k in range(tiny_config.num_mtp_heads):
        block, enorm, hnorm, eh_proj, final = _reference_head(torch_model, tensors, k)
        shifted = torch.nn.functional.pad(tokens_t[:, k + 1:], (0, k + 1))  # t_{i+k+1}
        with torch.no_grad():
            embedded = torch_model.model.embed_tokens(shifted)
            h = torch.cat([enorm(embedded), hnorm(previous)], dim=-1) @ eh_proj.T
            rope = torch_model.model.rotary_emb(h, positions, "sliding_attention")
            h = block(h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
            logits = torch_model.lm_head(final(h)).numpy()
        valid = LENGTH - k - 1  # later positions have no token t_{i+k+1} in the sequence
        np.testing.assert_allclose(np.asarray(out.mtp_logits[k])[:, :valid], logits[:, :valid],
                                   atol=TOL, rtol=0, err_msg=f"MTP head {k}")
        previous = h
