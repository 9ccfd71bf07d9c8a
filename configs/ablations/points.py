"""The report's architecture ablations as config functions over the tiny model (configs/tiny.py).

Each function takes a run config and returns it changed in one respect; a sweep file
(`attention.py`, `mtp.py`, `moe.py` beside this one) names its points as compositions of them.
Scaling to the tiny model: the full model trains 32k-token rows with a 128-token window (the
query sees itself and the 128 keys before it); the report's comparison is 128 against 512 keys.
The tiny model trains 128-token rows, so the ablation keeps the report's 4x ratio at 8 against 32
keys before the query (windows of 9 and 33 here, which count the query itself).
"""

import ml_collections

from configs import tiny

SMALL_WINDOW = 9  # the report's 128 keys, scaled: 8 keys before the query
LARGE_WINDOW = 33  # the report's 512 keys, scaled: 32 keys before the query (tiny's default)


def base() -> ml_collections.ConfigDict:
    """The tiny run every point starts from: 200 steps (~5 minutes on a 2-core CPU), evaluated
    every 100 on 8 held-out batches, one checkpoint at the end (points are compared on their
    final eval)."""
    config = tiny.get_config()
    config.data.eval_batches = 8
    train = config.train
    train.steps = 200
    train.eval_every = 100
    train.checkpoint_every = 200
    train.log_every = 20
    return config


def window(config: ml_collections.ConfigDict, size: int) -> ml_collections.ConfigDict:
    """Sliding-window layers see `size` keys (the query included)."""
    config.model.sliding.sliding_window = size
    return config


def sinks(config: ml_collections.ConfigDict, on: bool) -> ml_collections.ConfigDict:
    """The learnable sink logit of the sliding-window layers on or off (global layers have none,
    as in the report)."""
    config.model.sliding.attention_sink = on
    return config


def hybrid_ratio(config: ml_collections.ConfigDict, swa_per_global: int
                 ) -> ml_collections.ConfigDict:
    """`swa_per_global` sliding-window layers per global one after the first layer (5 is the
    report's 5:1); 0 makes every layer global."""
    model = config.model
    model.global_period = swa_per_global + 1
    model.layer_types = ""  # derived again from global_period
    return config


def mtp_heads(config: ml_collections.ConfigDict, heads: int) -> ml_collections.ConfigDict:
    """`heads` MTP heads trained with the main model (0 trains none)."""
    config.model.num_mtp_heads = heads
    return config


def dense_ffn(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every layer a dense SwiGLU as wide as the MoE's active experts together (top-k times the
    expert width): the same active FFN parameters per token, without routing."""
    model = config.model
    model.dense_intermediate_size = model.num_experts_per_token * model.moe_intermediate_size
    model.num_dense_layers = model.num_layers
    model.mlp_types = ""  # derived again from num_dense_layers
    return config
