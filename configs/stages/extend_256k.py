r"""Stage 3, context extension (26-27T tokens): sequences of 262,144 tokens, batch 256, the GA
RoPE theta raised from 640k to 5M (SWA keeps 10k; no YaRN), cosine from 3e-5 to 1e-5, expert
bias update rate 1e-5, MTP loss weight 0.1 (report section 3.2). Long documents are packed
whole where they fit (`data.max_document_bytes` = 0).

    python -m mimo_jax.train.pretrain --config configs/stages/extend_256k.py --workdir DIR \
        --config.init_from=STAGE2_WORKDIR

Starting from the stage-2 workdir, the run lists the fields it changes (the GA RoPE theta) and
refuses a checkpoint of any other architecture. The mesh splits the 262,144 tokens of a row over
16 context shards (16,384 tokens per device, as in stage 1); `python -m mimo_jax.plan --config configs/stages/extend_256k.py --mesh
v5p-512 --param_dtype bfloat16` says what that needs per device.
"""

import ml_collections

from configs.stages import mid_training

SEQ_LEN = 262_144
BATCH = 256


def get_config() -> ml_collections.ConfigDict:
    config = mid_training.get_config()
    config.model.full.rope_theta = 5_000_000.0
    data = config.data
    data.seq_len = SEQ_LEN
    data.batch_size = BATCH
    data.max_document_bytes = 0
    train = config.train
    train.steps = round(1e12 / (SEQ_LEN * BATCH))  # 14,901
    train.learning_rate = 3e-5
    train.end_learning_rate = 1e-5
    train.warmup_fraction = 0.0
    train.decay_start_fraction = 0.0
    train.bias_update_rate = 1e-5
    train.mtp_loss_weight = 0.1
    train.grad_accum_steps = 16
    config.mesh.ici = "fsdp=-1,expert=16,context=16"
    return config
