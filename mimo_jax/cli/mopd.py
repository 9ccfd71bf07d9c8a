r"""`python -m mimo_jax.train.mopd`: multi-teacher on-policy distillation (and RL with outcome
rewards) of a student.

    python -m mimo_jax.train.mopd --config configs/mopd_tiny.py --workdir /tmp/mimo_mopd \
        --config.init_from=/tmp/student/export \
        --config.mopd.teachers=addition=/tmp/teach_add/export,reverse=/tmp/teach_rev/export

Each step the student samples `mopd.samples_per_prompt` responses to `mopd.prompts_per_domain`
prompts of every domain; the domain's frozen teacher scores each token and its outcome reward
scores each response; the update follows the report's MOPD loss. `--config.mopd.use_teacher=False`
is ORM-only RL (GRPO), `--config.mopd.alpha=0` MOPD without outcome rewards. Running the same
command again resumes from the newest checkpoint in the workdir. SIGTERM saves a checkpoint and
exits 0. A bad config value, teacher, tokenizer or prompt file ends the run with one line
`error: ...` and exit status 1. The training itself is `mimo_jax.train.mopd_trainer.run`.
"""

from __future__ import annotations

from mimo_jax.cli.training import training_command
from mimo_jax.train import mopd_trainer

main = training_command(mopd_trainer.run, example="configs/mopd_tiny.py")
