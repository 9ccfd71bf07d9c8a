r"""The post-training demonstration on CPU (`python benchmarks/mopd.py`): two self-checked
domains (sums of numbers below 100, sorting 3-6 letters), a weak student, a teacher per domain,
and MOPD of the student.

    python benchmarks/mopd.py                       # every stage, then the table
    python -m mimo_jax.train.mopd --config configs/mopd_demo.py --workdir runs/mopd_demo/mopd \
        --config.init_from=runs/mopd_demo/student \
        --config.mopd.teachers=addition_small=runs/mopd_demo/teacher_addition_small,sort=runs/mopd_demo/teacher_sort

The model is MiMo-V2-Flash's architecture at the size a 2-core CPU trains in minutes: 4 layers
(global first, then sliding with a 17-token window), 8 experts top-2, a byte-level tokenizer
without merges (digits and letters are single tokens). `sft_config` gives the SFT runs that make
the student and the teachers; `get_config` the MOPD run.
"""

import ml_collections

from configs import mopd_mimo_v2_flash, sft_mimo_v2_flash, tiny

DOMAINS = ("addition_small", "sort")
VOCAB_SIZE = 258  # 256 bytes + padding + end-of-text: `train_bpe` with no merges


def model_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """configs/tiny.py's model made smaller: the demonstration's every run uses this one."""
    model = config.model
    model.vocab_size = VOCAB_SIZE
    model.num_layers = 4
    model.num_experts = 8
    model.num_experts_per_token = 2
    model.moe_intermediate_size = 128
    model.dense_intermediate_size = 256
    model.sliding.sliding_window = 17
    model.num_mtp_heads = 0  # the demonstration decodes plainly; no MTP loss to pay for
    model.runtime.attention_chunk_size = 64
    return config


def sft_config(train_file: str, tokenizer_file: str, init_from: str, steps: int,
               learning_rate: float) -> ml_collections.ConfigDict:
    """SFT of the demonstration model on one JSON-lines file, 32 rows of 64 tokens a step,
    warm-up then cosine to a tenth; `init_from` "" starts from a random initialisation."""
    config = model_settings(sft_mimo_v2_flash.sft_settings(tiny.get_config()))
    config.sft.copy_mtp_head = False
    config.init_from = init_from
    data = config.data
    data.tokenizer = tokenizer_file
    data.train_sources = f"jsonl:{train_file}"
    data.eval_sources = ""
    data.eval_batches = 0
    data.seq_len = 64
    data.batch_size = 32
    train = config.train
    train.steps = steps
    train.learning_rate = learning_rate
    train.end_learning_rate = learning_rate / 10
    train.warmup_fraction = train.decay_start_fraction = 0.05
    train.log_every = 50
    train.eval_every = 0
    train.checkpoint_every = steps
    train.plot = False
    return config


def get_config() -> ml_collections.ConfigDict:
    """MOPD of the student: 64 prompts x 4 samples per domain per step, answers <= 8 tokens
    sampled at temperature 1 inside the top 0.9 of the probability, 200 steps, learning rate
    8e-4 after a warm-up of a tenth of the run, then a cosine to a tenth.

    Why these (probes from the demonstration's student, README "The demonstration"): with 8
    prompts a step the updates were too noisy for this model. The top-p keeps the student from
    sampling its tail, whose tokens the teacher scores near -19 and which then dominate the
    update without naming the right token (pi_theta / mu stays >= 0.9, so nothing is masked):
    0.844 on addition against 0.813 without it after 150 steps. The decay takes the reverse KL
    below the 0.34 nats per token at which a constant rate levelled off."""
    config = model_settings(mopd_mimo_v2_flash.mopd_settings(tiny.get_config()))
    mopd = config.mopd
    mopd.domains = ",".join(DOMAINS)
    mopd.prompts = ",".join(f"{d}=task:{d}" for d in DOMAINS)
    mopd.rewards = ",".join(f"{d}=exact_match" for d in DOMAINS)
    mopd.prompts_per_domain = 64
    mopd.samples_per_prompt = 4
    mopd.max_prompt_tokens = 16
    mopd.max_response_tokens = 8
    mopd.top_p = 0.9
    mopd.eval_prompts = 0  # benchmarks/mopd.py evaluates every model once, on the same prompts
    train = config.train
    train.num_devices = 1  # a CPU config: the rollouts are too small to split
    train.steps = 200
    train.learning_rate = 8e-4
    train.end_learning_rate = 8e-5
    train.warmup_fraction = train.decay_start_fraction = 0.1
    train.log_every = 25
    train.eval_every = 0
    train.checkpoint_every = 200
    train.plot = False
    return config
