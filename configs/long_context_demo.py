r"""The long-context demonstration on CPU (`python benchmarks/long_context.py`): a small model
trained at 128 tokens, then continued at 4x the length with the global layers' RoPE theta raised,
as stage 3 of pre-training does (`configs/stages/extend_256k.py`).

    python -m mimo_jax.train.pretrain --config configs/long_context_demo.py --workdir runs/lc/short
    python -m mimo_jax.train.pretrain --config configs/long_context_demo.py --workdir runs/lc/long \
        --config.init_from=runs/lc/short --config.data.tokenizer= \
        --config.model.full.rope_theta=5000000.0 --config.data.seq_len=512 ...

`short_config` and `long_config` hold both stages' settings; the model is configs/tiny.py's
made smaller so that both stages train on 2 CPU cores in about ten minutes: 4 layers (global,
sliding, sliding, global), no MTP head (the demonstration scores the main head only).
"""

import ml_collections

from configs import tiny

SHORT_LEN = 128
EXTENSION = 4
LONG_THETA = 5_000_000.0  # the GA theta after extension (640k before), as in stage 3


def _model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    model = config.model
    model.num_layers = 4
    model.layer_types = "global,sliding,sliding,global"
    model.num_mtp_heads = 0
    model.num_experts = 8
    model.num_experts_per_token = 2
    model.moe_intermediate_size = 128
    return config


def get_config() -> ml_collections.ConfigDict:
    """The short stage: 128-token rows, 8 a step, on the standard-library corpus (the
    demonstration adds its retrieval documents to the mixture)."""
    return short_config()


def short_config(steps: int = 400) -> ml_collections.ConfigDict:
    """The first stage at `SHORT_LEN` tokens: warm-up then cosine from 3e-3 to 3e-4."""
    config = _model(tiny.get_config())
    config.data.seq_len = SHORT_LEN
    config.data.tokenizer_train_bytes = 2_000_000  # the BPE trains in seconds, not a minute
    train = config.train
    train.steps = steps
    train.eval_every = 0
    train.checkpoint_every = steps
    train.log_every = 25
    return config


def long_config(init_from: str, steps: int = 100) -> ml_collections.ConfigDict:
    """The extension stage from `init_from` (the short stage's workdir): `EXTENSION` x longer
    rows (the same tokens per step: fewer rows), whole files packed, GA theta raised to
    `LONG_THETA`, no warm-up, cosine from 1e-3 to 3e-4."""
    config = short_config(steps)
    config.init_from = init_from
    config.model.full.rope_theta = LONG_THETA
    data = config.data
    data.tokenizer = ""  # the short stage's tokenizer (saved beside its parameters)
    data.seq_len = SHORT_LEN * EXTENSION
    data.batch_size = max(1, data.batch_size // EXTENSION)
    data.max_document_bytes = 0
    train = config.train
    train.learning_rate = 1e-3
    train.warmup_fraction = 0.0
    train.decay_start_fraction = 0.0
    return config
