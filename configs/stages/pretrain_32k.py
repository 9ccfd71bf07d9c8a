r"""Stage 1, pre-training (0-22T tokens): 32k context, GA RoPE theta 640k, the report's learning
rate schedule (section 3.2): linear warm-up to 3.2e-4 over 50B tokens, constant for 12T, cosine
to 1e-4 over 10T. Batch 2048 x 32,768 tokens (the report ramps the batch up over the first 500B
tokens; this config trains at the final batch from the start).

    python -m mimo_jax.train.pretrain --config configs/stages/pretrain_32k.py --workdir DIR
"""

import ml_collections

from configs import mimo_v2_flash

TOKENS_PER_STEP = 2048 * 32_768


def get_config() -> ml_collections.ConfigDict:
    config = mimo_v2_flash.get_config()
    train = config.train
    train.steps = round(22e12 / TOKENS_PER_STEP)  # 327,827
    train.learning_rate = 3.2e-4
    train.end_learning_rate = 1e-4
    warmup = round(50e9 / TOKENS_PER_STEP)  # 745 steps
    train.warmup_fraction = warmup / train.steps
    train.decay_start_fraction = (warmup + round(12e12 / TOKENS_PER_STEP)) / train.steps
    train.mtp_loss_weight = 0.3
    train.bias_update_rate = 1e-3
    return config
