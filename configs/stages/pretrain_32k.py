r"""Stage 1, pre-training (0-22T tokens): 32k context, GA RoPE theta 640k, the report's learning
rate schedule and batch ramp (section 3.2): the batch warms up linearly to 2048 x 32,768 tokens
over the first 500B tokens (here from one of its 16 micro-batches, 128 rows; the report does not
give the start), and the learning rate warms up linearly to 3.2e-4 over 50B tokens, stays
constant for 12T, then follows a cosine to 1e-4 over 10T. The schedule is in steps; the step
numbers below are those token counts under the ramp (`mimo_jax.train.batch_ramp`).

    python -m mimo_jax.train.pretrain --config configs/stages/pretrain_32k.py --workdir DIR
"""

import ml_collections

from configs import mimo_v2_flash
from mimo_jax.train.batch_ramp import BatchRamp, ramp_steps_for_rows, steps_for_rows

SEQ_LEN = 32_768
BATCH = 2048
TOKENS_PER_STEP = BATCH * SEQ_LEN  # after the ramp
RAMP_TOKENS = 500e9
RAMP_START = 1  # micro-batches at the first step


def get_config() -> ml_collections.ConfigDict:
    config = mimo_v2_flash.get_config()
    train = config.train
    micro = train.grad_accum_steps
    micro_rows = BATCH // micro

    ramp_steps = ramp_steps_for_rows(RAMP_TOKENS / SEQ_LEN, RAMP_START, micro, micro_rows)
    ramp = BatchRamp(ramp_steps, RAMP_START, micro)

    def steps_for(tokens: float) -> int:
        return steps_for_rows(tokens / SEQ_LEN, ramp, micro_rows)

    train.batch_ramp_steps = ramp_steps  # 14,026
    train.batch_ramp_start = RAMP_START
    train.steps = steps_for(22e12)  # 334,401 (327,827 at the final batch throughout)
    train.learning_rate = 3.2e-4
    train.end_learning_rate = 1e-4
    train.warmup_fraction = steps_for(50e9) / train.steps  # 4,138 steps
    train.decay_start_fraction = steps_for(50e9 + 12e12) / train.steps  # step 186,135
    train.mtp_loss_weight = 0.3
    train.bias_update_rate = 1e-3
    return config
