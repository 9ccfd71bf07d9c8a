"""`import mimo_jax`: the names a notebook uses, end to end on a micro model, and the commands of
the same names still run as programs."""

import functools
import importlib
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import mimo_jax
from mimo_jax import convert, inference, model
from mimo_jax.config import ConfigError
from mimo_jax.data.tokenizer import train_bpe
from mimo_jax.inference import generation
from mimo_jax.train import trainer
from mimo_jax.train.checkpoint import EXPORT_DIR, export_params

REPO = pathlib.Path(__file__).resolve().parents[1]

# configs/tiny.py shrunk to 2 layers (global + dense FFN, sliding + MoE) and one MTP head; the
# values are text, as a command line gives them. init_std 0.06 widens the argmax margins.
MICRO = {
    "model.num_layers": "2", "model.layer_types": "global,sliding", "model.vocab_size": "300",
    "model.hidden_size": "32", "model.sliding.num_heads": "2", "model.sliding.num_kv_heads": "2",
    "model.sliding.qk_head_dim": "16", "model.sliding.v_head_dim": "8",
    "model.sliding.rope_dim": "8", "model.sliding.sliding_window": "5",
    "model.full.num_heads": "2", "model.full.num_kv_heads": "1", "model.full.qk_head_dim": "16",
    "model.full.v_head_dim": "8", "model.full.rope_dim": "8",
    "model.dense_intermediate_size": "64", "model.moe_intermediate_size": "16",
    "model.num_experts": "4", "model.num_experts_per_token": "2", "model.num_mtp_heads": "1",
    "model.runtime.attention_chunk_size": "8", "model.init_std": "0.06",
}
PROMPT = "def add(x, y):\n"
NEW_TOKENS = 6
# The modules that `python -m` runs; importing one would shadow a public name of the same name.
ENTRY_MODULES = ("mimo_jax.generate", "mimo_jax.summary", "mimo_jax.plan",
                 "mimo_jax.train.pretrain", "mimo_jax.train.sft", "mimo_jax.train.mopd",
                 "mimo_jax.train.plot", "mimo_jax.ablate",
                 "mimo_jax.data.to_array_record", "mimo_jax.eval.long_context",
                 "mimo_jax.convert.to_orbax")


@pytest.fixture(scope="module", name="micro")
def fixture_micro(tmp_path_factory):
    """The micro run config, its model and initialised params, and a tokenizer of 300 ids."""
    config = mimo_jax.load_config(REPO / "configs" / "tiny.py", overrides=MICRO)
    net = mimo_jax.MiMoV2Flash(mimo_jax.build_configs(config).model)
    params = mimo_jax.init_params(net, jax.random.key(0))
    tokenizer = train_bpe(["def add(x, y):\n    return x + y\n"] * 30, vocab_size=300,
                          max_bytes=10_000)
    directory = tmp_path_factory.mktemp("micro")
    tokenizer.save(directory / "tokenizer.json")
    return config, net, params, tokenizer, directory


@functools.partial(jax.jit, static_argnums=0)
def _logits(net, params, tokens):
    return net.apply({"params": params}, tokens).logits


def _greedy_by_full_forward(net, params, prompt: np.ndarray, steps: int) -> list[int]:
    """Greedy continuation without a cache: a whole forward pass per new token (over a buffer of
    the final length; attention is causal, so the positions not yet filled change nothing)."""
    tokens = np.zeros((1, prompt.size + steps), np.int32)
    tokens[0, :prompt.size] = prompt
    for position in range(prompt.size, prompt.size + steps):
        tokens[0, position] = int(np.argmax(_logits(net, params, tokens)[0, position - 1]))
    return [int(t) for t in tokens[0, prompt.size:]]


def test_every_public_name_resolves_to_its_module():
    assert sorted(mimo_jax.__all__) == sorted(set(mimo_jax.__all__))
    for name in mimo_jax.__all__:
        module, attribute = mimo_jax._EXPORTS[name]  # pylint: disable=protected-access
        assert getattr(mimo_jax, name) is getattr(importlib.import_module(module), attribute)
        assert name in dir(mimo_jax)
    assert mimo_jax.generate is generation.generate and callable(mimo_jax.summary)
    assert mimo_jax.load_hf is convert.hf.load and mimo_jax.save_hf is convert.hf.save
    assert mimo_jax.pretrain is trainer.run
    with pytest.raises(AttributeError, match="no attribute 'generator'"):
        getattr(mimo_jax, "generator")
    for package in (model, convert, inference):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    assert inference.generate is mimo_jax.generate and model.summary is mimo_jax.summary


def test_nothing_imports_the_command_entry_modules():
    pattern = re.compile(r"^\s*(from\s+(%s)\s+import|import\s+(%s)\b)" % (
        "|".join(map(re.escape, ENTRY_MODULES)), "|".join(map(re.escape, ENTRY_MODULES))),
        re.MULTILINE)
    offenders = [str(path.relative_to(REPO)) for folder in ("mimo_jax", "tests", "benchmarks",
                                                             "launch")
                 for path in (REPO / folder).rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == [], "import mimo_jax.cli.* or the library instead"
    for name in ENTRY_MODULES:
        assert name not in sys.modules, name


def test_load_config_reads_text_overrides_and_names_bad_keys(micro):
    config = micro[0]
    assert config.model.num_layers == 2 and config.model.init_std == 0.06
    assert config.model.sliding.sliding_window == 5 and config.model.layer_types == "global,sliding"
    same = mimo_jax.load_config("configs.tiny", overrides={"config.model.num_layers": 2,
                                                           "train.plot": "false"})
    assert same.model.num_layers == 2 and same.train.plot is False
    with pytest.raises(ConfigError, match="'model.num_layer' does not exist"):
        mimo_jax.load_config("configs.tiny", overrides={"model.num_layer": 3})
    with pytest.raises(ConfigError, match="'model.hidden_size' = 'wide'"):
        mimo_jax.load_config("configs.tiny", overrides={"model.hidden_size": "wide"})
    with pytest.raises(ConfigError, match="'train.plot' = 'maybe'"):
        mimo_jax.load_config("configs.tiny", overrides={"train.plot": "maybe"})
    with pytest.raises(ConfigError, match="no_such.py"):
        mimo_jax.load_config("configs/no_such.py")


def test_summary_counts_the_micro_model(micro):
    config, net, _, _, _ = micro
    table = mimo_jax.summary(config)
    assert table == mimo_jax.summary(net.config) == mimo_jax.summary(config.model)
    rows = {line[:32].strip(): line[32:].split() for line in table.splitlines()}
    assert rows["embedding"] == ["9,600", "9,600"]  # 300 ids x 32
    # 4 experts x 3 matrices of 32 x 16, of which a token uses 2 experts
    assert rows["MoE experts"] == ["6,144", "3,072"]


def test_tiny_end_to_end_generate_save_load(micro):
    _, net, params, _, directory = micro
    prompt = np.random.default_rng(0).integers(2, 300, (7,)).astype(np.int32)
    out = mimo_jax.generate(net, params, prompt[None], np.asarray([7], np.int32),
                            max_new_tokens=NEW_TOKENS)
    assert out.generated(0) == _greedy_by_full_forward(net, params, prompt, NEW_TOKENS)

    mimo_jax.save_hf(net.config, params, str(directory / "hf"))
    # A Hugging Face config.json holds the architecture; the runtime choices come from the caller.
    runtime = {k: getattr(net.config.runtime, k) for k in ("moe_impl", "attention_impl",
                                                           "attention_chunk_size", "dtype")}
    runtime.update(scan_layers=net.config.scan_layers, param_dtype=net.config.param_dtype)
    loaded, loaded_params = mimo_jax.load_hf(str(directory / "hf"), **runtime)
    assert loaded.config == net.config
    tokens = np.zeros((1, 7 + NEW_TOKENS), np.int32)
    tokens[0, :7], tokens[0, 7:] = prompt, out.generated(0)
    np.testing.assert_array_equal(np.asarray(_logits(loaded, loaded_params, tokens)),
                                  np.asarray(_logits(net, params, tokens)))
    again = mimo_jax.generate(loaded, loaded_params, prompt[None], np.asarray([7], np.int32),
                              max_new_tokens=NEW_TOKENS)
    assert again.generated(0) == out.generated(0)


def test_generate_command_prints_what_the_api_generates(micro):
    _, net, params, tokenizer, directory = micro
    export_params(directory / EXPORT_DIR, params, net.config, directory / "tokenizer.json")
    loaded, loaded_params, loaded_tokenizer = mimo_jax.load_checkpoint(directory)
    assert loaded.config == net.config
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()
    ids = tokenizer.encode(PROMPT)
    out = mimo_jax.generate(loaded, loaded_params, ids[None].astype(np.int32),
                            np.asarray([ids.size], np.int32), max_new_tokens=NEW_TOKENS,
                            stop_tokens=(tokenizer.eos_id,))
    result = subprocess.run(
        [sys.executable, "-m", "mimo_jax.generate", f"--checkpoint={directory}",
         f"--prompt={PROMPT}", f"--max_new_tokens={NEW_TOKENS}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + tokenizer.decode(out.generated(0)) + "\n"
    assert f"{out.num_generated[0]} tokens; first after" in result.stderr
    assert callable(mimo_jax.generate)  # the command ran in its own process; the name is intact
    usage = subprocess.run([sys.executable, "-m", "mimo_jax.generate", "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=300, check=False).stdout
    assert "generates text from a trained model" in usage and "--checkpoint:" in usage
