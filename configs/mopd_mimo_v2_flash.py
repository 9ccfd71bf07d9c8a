"""MOPD of the full model (report section 4.4): one student, a teacher per domain.

    python -m mimo_jax.train.mopd --config configs/mopd_mimo_v2_flash.py --workdir DIR \
        --config.init_from=SFT_RUN --config.mopd.teachers=math=T_MATH,code=T_CODE

The report gives neither alpha nor the ratio bounds nor the learning rate of MOPD; the values
here are this project's starting points (alpha 1, IcePop-style bounds [0.5, 2], constant 1e-6).
The run uses the full config's mesh on one host (rollouts, teacher scores and updates split by
its rules); each domain's prompts x samples must split over its batch axes.
"""

import ml_collections

from configs import mimo_v2_flash


def mopd_section() -> ml_collections.ConfigDict:
    """The `mopd` section's defaults, without domains."""
    return ml_collections.ConfigDict(dict(
        domains="", teachers="", prompts="", rewards="", prompts_per_domain=4,
        samples_per_prompt=8, max_prompt_tokens=1024, max_response_tokens=4096,
        temperature=1.0, top_p=1.0, alpha=1.0, eps_low=0.5, eps_high=2.0, use_teacher=True,
        routing_replay=True, eval_prompts=64, seed=0))


def mopd_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A pretraining config turned into an MOPD one: init_from, the mopd section, post-training
    optimiser settings; its data section is dropped (prompts come from mopd.prompts)."""
    del config.data
    config.init_from = ""
    config.mopd = mopd_section()
    train = config.train
    train.learning_rate = 1e-6
    train.end_learning_rate = 1e-6
    train.warmup_fraction = 0.0
    train.decay_start_fraction = 1.0
    train.grad_accum_steps = 1
    train.mtp_loss_weight = 0.0
    train.balance_loss_weight = 1e-6
    train.bias_update_rate = 1e-4
    train.eval_every = 50
    train.checkpoint_every = 50
    return config


def get_config() -> ml_collections.ConfigDict:
    """Math and code domains with outcome rewards checked by their own verifiers."""
    config = mopd_settings(mimo_v2_flash.get_config())
    config.model.num_mtp_heads = 3
    config.mopd.domains = "math,code"
    config.mopd.prompts = "math=jsonl:prompts/math/*.jsonl,code=jsonl:prompts/code/*.jsonl"
    config.mopd.rewards = "math=exact_match,code=exact_match"
    config.train.steps = 1000
    return config
