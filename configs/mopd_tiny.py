r"""MOPD of a tiny student on two self-checked domains (addition, string reversal), on CPU.

    python -m mimo_jax.train.mopd --config configs/mopd_tiny.py --workdir runs/mopd_tiny \
        --config.init_from=runs/student/export \
        --config.mopd.teachers=addition=runs/teach_add/export,reverse=runs/teach_rev/export

`python benchmarks/mopd.py` makes the student and the teachers (and runs every variant).
"""

import ml_collections

from configs import mopd_mimo_v2_flash, tiny


def get_config() -> ml_collections.ConfigDict:
    """configs/tiny.py's model; 4 prompts x 4 samples per domain per step, answers <= 8 tokens."""
    config = mopd_mimo_v2_flash.mopd_settings(tiny.get_config())
    mopd = config.mopd
    mopd.domains = "addition,reverse"
    mopd.prompts = "addition=task:addition,reverse=task:reverse"
    mopd.rewards = "addition=exact_match,reverse=exact_match"
    mopd.prompts_per_domain = 4
    mopd.samples_per_prompt = 4
    mopd.max_prompt_tokens = 24
    mopd.max_response_tokens = 8
    mopd.eval_prompts = 64
    train = config.train
    train.num_devices = 1  # a CPU config: the rollouts are too small to split
    train.steps = 100
    train.learning_rate = 1e-4
    train.end_learning_rate = 1e-4
    train.log_every = 5
    train.eval_every = 25
    train.checkpoint_every = 25
    return config
