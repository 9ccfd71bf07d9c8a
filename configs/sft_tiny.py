r"""SFT of the tiny model on CPU, from the README's pretraining run, with the report's settings.

    python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir runs/tiny
    python -c "from mimo_jax.eval import tasks; t = tasks.get_task('addition'); \
        tasks.write_sft_jsonl('runs/sft_data/train.jsonl', t.examples(0, 2000)); \
        tasks.write_sft_jsonl('runs/sft_data/test.jsonl', t.examples(0, 64, 'test'))"
    python -m mimo_jax.train.sft --config configs/sft_tiny.py --workdir runs/sft_tiny

The two MTP heads of the pretrained tiny model are kept and a third starts as a copy of head 0.
"""

import ml_collections

from configs import sft_mimo_v2_flash, tiny


def get_config() -> ml_collections.ConfigDict:
    """configs/tiny.py's model with 3 MTP heads; 200 steps of 8 x 128 tokens."""
    config = sft_mimo_v2_flash.sft_settings(tiny.get_config())
    config.init_from = "runs/tiny"
    data = config.data
    data.train_sources = "jsonl:runs/sft_data/train.jsonl"
    data.eval_sources = "jsonl:runs/sft_data/test.jsonl"
    data.seq_len = 128
    data.batch_size = 8
    data.eval_batches = 4
    train = config.train
    train.steps = 200
    train.log_every = 10
    train.eval_every = 50
    train.checkpoint_every = 50
    return config
