"""Micro training runs for the tests: a micro model (2 layers: global+dense, sliding+MoE, one MTP
head) that compiles in seconds, a small text corpus with its tokenizer, and config builders for
in-process runs and for the command line. The fixtures `micro` and `corpus_dir` (conftest.py)
hand them to test modules."""

import pathlib

import ml_collections
import numpy as np

from configs import tiny
from mimo_jax.data import tokenizer as tokenizer_lib

MICRO_MODEL = {
    "num_layers": 2, "layer_types": "global,sliding", "vocab_size": 320, "hidden_size": 32,
    "sliding.num_heads": 2, "sliding.num_kv_heads": 1, "sliding.qk_head_dim": 16,
    "sliding.v_head_dim": 8, "sliding.rope_dim": 8, "sliding.sliding_window": 9,
    "full.num_heads": 2, "full.num_kv_heads": 1, "full.qk_head_dim": 16, "full.v_head_dim": 8,
    "full.rope_dim": 8, "dense_intermediate_size": 64, "moe_intermediate_size": 16,
    "num_experts": 4, "num_experts_per_token": 2, "num_mtp_heads": 1,
    "runtime.attention_chunk_size": 8,
}
MICRO_TRAIN = {
    "data.seq_len": 32, "data.batch_size": 4, "data.eval_batches": 2,
    "train.steps": 12, "train.learning_rate": 3e-3, "train.warmup_fraction": 0.2,
    "train.decay_start_fraction": 0.5, "train.log_every": 1, "train.eval_every": 6,
    "train.checkpoint_every": 3, "train.keep_last": 10, "train.progress": "log",
    "train.tensorboard": True, "train.num_devices": 1,
}


def micro_overrides(workdir_data: pathlib.Path, **extra) -> dict:
    """Every override of configs/tiny.py for a micro run on the test corpus."""
    values = {f"model.{k}": v for k, v in MICRO_MODEL.items()}
    values.update(MICRO_TRAIN)
    values["data.train_sources"] = f"text:{workdir_data / 'train'}"
    values["data.eval_sources"] = f"text:{workdir_data / 'eval'}"
    values["data.tokenizer"] = str(workdir_data / "tokenizer.json")
    values.update(extra)
    return values


def build_config(overrides: dict) -> ml_collections.ConfigDict:
    """configs/tiny.py with dotted-key overrides applied, as `--config.a.b=v` would."""
    config = tiny.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def command_line(overrides: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def make_corpus(root: pathlib.Path) -> pathlib.Path:
    """train/ and eval/ text files of a tiny Python-like language, and a tokenizer for them."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "x", "y", "(", ")", ":", "=", "+", "if", "else", "\n    "]
    for split, count in (("train", 60), ("eval", 6)):
        (root / split).mkdir()
        for i in range(count):
            text = " ".join(rng.choice(words, size=int(rng.integers(30, 200))))
            (root / split / f"{i:03d}.py").write_text(text)
    texts = (p.read_text() for p in sorted((root / "train").iterdir()))
    tokenizer_lib.train_bpe(texts, 320, 1_000_000).save(root / "tokenizer.json")
    return root
