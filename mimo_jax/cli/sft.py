r"""`python -m mimo_jax.train.sft`: supervised fine-tuning on prompt/response pairs.

    python -m mimo_jax.train.sft --config configs/sft_tiny.py --workdir /tmp/mimo_sft \
        --config.init_from=/tmp/mimo_tiny/export \
        --config.data.train_sources=jsonl:/data/sft/train.jsonl \
        --config.data.eval_sources=jsonl:/data/sft/test.jsonl

Each line of the JSON-lines files is {"prompt": ..., "response": ...}; the loss counts the
response tokens only, and examples are packed whole. `init_from` names the starting parameters:
a params export, a training workdir or a Hugging Face directory (empty: a random start). The
optimizer and the data start fresh; the architecture must match the config's. Running the same
command again resumes from the newest checkpoint in the workdir (init_from is then not read).
SIGTERM saves a checkpoint and exits 0. A bad config value, data file or init checkpoint ends the
run with one line `error: ...` and exit status 1. The training itself is
`mimo_jax.train.sft_trainer.run`.
"""

from __future__ import annotations

from mimo_jax.cli.training import training_command
from mimo_jax.train import sft_trainer

main = training_command(sft_trainer.run, example="configs/sft_tiny.py")
