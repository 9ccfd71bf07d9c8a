r"""`python -m mimo_jax.train.pretrain`: pretrains MiMo-V2-Flash (or a scaled-down relative).

    python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir /tmp/mimo_tiny
    python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir /tmp/mimo_tiny \
        --config.train.steps=2000 --config.data.batch_size=32

Running the same command again resumes from the newest checkpoint in the workdir. SIGTERM
(what a scheduler sends before preempting a job) saves a checkpoint at the current step and exits
0; a second SIGTERM does not interrupt the save. A bad config value, data path or checkpoint
ends the run with one line `error: ...` and exit status 1; checkpoints already written are kept.
The training itself is `mimo_jax.train.trainer.run` (`mimo_jax.pretrain` in a notebook).
"""

from __future__ import annotations

from mimo_jax.cli.training import training_command
from mimo_jax.train import trainer

main = training_command(trainer.run, example="configs/tiny.py")
