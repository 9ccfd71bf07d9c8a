"""Training: the loop and its hooks; the pretraining and SFT trainers, their configs, optimizer,
losses, steps, checkpoints, and `init_from` (starting a run from trained parameters).

`python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir DIR` pretrains;
`python -m mimo_jax.train.sft --config configs/sft_tiny.py --workdir DIR` fine-tunes;
`python -m mimo_jax.train.plot --workdir DIR` draws the loss curves of either.
"""
