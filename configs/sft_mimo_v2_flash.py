r"""Supervised fine-tuning of the full MiMo-V2-Flash: the report's SFT settings.

    python -m mimo_jax.train.sft --config configs/sft_mimo_v2_flash.py --workdir DIR \
        --config.init_from=/path/to/pretrained --config.data.train_sources=jsonl:/data/sft/*.jsonl

Optimisation (the report, SPEC.md): a plain cosine from 5e-5 to 5e-6 (no warm-up, no constant
phase), AdamW eps 1e-8, router-bias rate 1e-4, sequence balance-loss weight 1e-6. The pretrained
MTP head is copied into 3 heads (`sft.copy_mtp_head`), which then train jointly.
"""

import ml_collections

from configs import mimo_v2_flash


def sft_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The report's SFT optimisation and the SFT sections, set on a pretraining config."""
    train = config.train
    train.learning_rate = 5e-5
    train.end_learning_rate = 5e-6
    train.warmup_fraction = 0.0  # with decay_start_fraction 0: a cosine from step 0 to the end
    train.decay_start_fraction = 0.0
    train.adam_eps = 1e-8
    train.bias_update_rate = 1e-4
    train.balance_loss_weight = 1e-6
    # Post-training uses 3 MTP heads (self-speculative decoding); the pretrained one is copied.
    config.model.num_mtp_heads = 3
    config.sft = ml_collections.ConfigDict()
    config.sft.copy_mtp_head = True
    config.sft.too_long = "drop"  # or "error"
    # Where the parameters start: a params export, a training workdir or a Hugging Face
    # directory; "" = a random initialisation. A workdir with a checkpoint resumes instead.
    config.init_from = ""
    config.data.tokenizer = ""  # "" = the tokenizer.json saved beside the init parameters
    return config


def get_config() -> ml_collections.ConfigDict:
    """The full model at 32k context, SFT on JSON-lines prompt/response files."""
    config = sft_settings(mimo_v2_flash.get_config())
    data = config.data
    # JSON-lines files of {"prompt": ..., "response": ...}; several as "jsonl:A,jsonl:B".
    data.train_sources = "jsonl:/data/sft/train/*.jsonl"
    data.eval_sources = "jsonl:/data/sft/eval/*.jsonl"
    data.batch_size = 256
    data.eval_batches = 16
    train = config.train
    train.steps = 20_000
    train.grad_accum_steps = 4
    train.eval_every = 1000
    train.checkpoint_every = 1000
    train.keep_every = 5000
    return config
