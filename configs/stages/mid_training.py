r"""Stage 2, mid-training (22-26T tokens): the stage-1 model on a data mixture with code
upsampled and about 5% synthetic reasoning data (point `data.train_sources` at it), cosine from
1e-4 to 3e-5 over 4T tokens, MTP loss weight 0.1; everything else as stage 1.

    python -m mimo_jax.train.pretrain --config configs/stages/mid_training.py --workdir DIR \
        --config.init_from=STAGE1_WORKDIR --config.data.train_sources=...
"""

import ml_collections

from configs.stages import pretrain_32k


def get_config() -> ml_collections.ConfigDict:
    config = pretrain_32k.get_config()
    train = config.train
    train.steps = round(4e12 / pretrain_32k.TOKENS_PER_STEP)  # 59,605
    train.learning_rate = 1e-4
    train.end_learning_rate = 3e-5
    train.warmup_fraction = 0.0
    train.decay_start_fraction = 0.0  # cosine from the first step
    train.mtp_loss_weight = 0.1
    train.bias_update_rate = 1e-3
    train.batch_ramp_steps = 0  # the batch reached 2048 in stage 1 and stays there
    return config
