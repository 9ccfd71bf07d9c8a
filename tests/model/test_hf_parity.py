"""Parity with the reference: transformers' `MiMoV2FlashForCausalLM` on a tiny random config.

One random torch model (module-scoped) is saved with `save_pretrained`, read with `hf.load`, and
run on a sequence several sliding windows long; logits must agree to 1e-4 in float32 for every
backend combination, for packed documents (the reference runs each document alone), after
`hf.save` -> `from_pretrained`, and from transformers' fused expert / `sinks` parameter names.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import MiMoV2FlashForCausalLM

import hf_reference
from mimo_jax.convert import hf

VOCAB = 512
WINDOW = hf_reference.WINDOW  # T=64 spans seven windows
LENGTH = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, its save_pretrained directory)."""
    directory = str(tmp_path_factory.mktemp("hf_reference"))
    model = hf_reference.random_model(hf_reference.tiny_config(VOCAB), directory)
    return model, directory


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def loaded(reference):
    """hf.load once per backend combination, with one jitted forward each (compiled once)."""
    cache = {}

    def get(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            model, params = hf.load(reference[1], attention_chunk_size=16, **overrides)
            forward = jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s).logits)
            cache[key] = model, params, forward
        return cache[key]
    return get


def _ones(tokens):
    return jnp.ones(tokens.shape, jnp.int32)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, VOCAB, (2, LENGTH)).astype(np.int32)


@pytest.fixture(scope="module")
def reference_logits(reference, tokens):
    return _torch_logits(reference[0], tokens)


@pytest.mark.parametrize("scan_layers,moe_impl,attention_impl", [
    (True, "dense", "reference"),
    (False, "ragged", "chunked"),
    (True, "ragged", "chunked"),
])
def test_logits_match_transformers(loaded, tokens, reference_logits, scan_layers, moe_impl,
                                   attention_impl):
    model, params, forward = loaded(scan_layers=scan_layers, moe_impl=moe_impl,
                                    attention_impl=attention_impl)
    assert model.config.sliding.sliding_window == WINDOW
    assert model.config.sliding.num_kv_heads == 2 and model.config.full.num_kv_heads == 1
    logits = np.asarray(forward(params, jnp.asarray(tokens), _ones(tokens)))
    assert logits.shape == (2, LENGTH, VOCAB)
    assert np.abs(reference_logits).max() > 0.5  # the comparison is not between near-zeros
    np.testing.assert_allclose(logits, reference_logits, atol=TOL, rtol=0)


def test_packed_documents_match_reference_run_per_document(reference, loaded):
    lengths = [[23, 30, 7], [40, 20]]  # row 0 ends in 4 padding tokens, row 1 in 4
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, (2, LENGTH)).astype(np.int32)
    segments = np.zeros((2, LENGTH), np.int32)
    for row, docs in enumerate(lengths):
        start = 0
        for doc_id, n in enumerate(docs, start=1):
            segments[row, start:start + n] = doc_id
            start += n
    _, params, forward = loaded(scan_layers=True, moe_impl="ragged", attention_impl="chunked")
    logits = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(segments)))
    for row, docs in enumerate(lengths):
        start = 0
        for n in docs:
            expected = _torch_logits(reference[0], tokens[row:row + 1, start:start + n])[0]
            np.testing.assert_allclose(logits[row, start:start + n], expected, atol=TOL, rtol=0)
            start += n


def test_save_loads_in_transformers_with_same_logits(reference, tokens, reference_logits,
                                                     tmp_path):
    model, params = hf.load(reference[1])
    hf.save(model.config, params, str(tmp_path), max_shard_bytes=200_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")  # sharded on purpose
    reloaded = MiMoV2FlashForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert reloaded.config.sliding_window == WINDOW
    assert reloaded.config.layer_types == reference[0].config.layer_types
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), reference_logits, atol=1e-6,
                               rtol=0)


def test_fused_expert_and_sinks_names_load_the_same_params(reference, tmp_path):
    """transformers' own parameter names: mlp.experts.gate_up_proj/down_proj and self_attn.sinks."""
    torch_model, directory = reference
    state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    assert "model.layers.1.self_attn.sinks" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    _, fused = hf.load(str(tmp_path), scan_layers=False)
    _, per_expert = hf.load(directory, scan_layers=False)
    flat_fused = dict(_leaves(fused))
    for path, value in _leaves(per_expert):
        np.testing.assert_array_equal(np.asarray(flat_fused[path]), np.asarray(value), err_msg=path)


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value
