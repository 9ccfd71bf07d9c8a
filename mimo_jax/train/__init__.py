"""Pretraining: config, optimizer, losses, train/eval steps, checkpoints, metrics, the trainer.

`python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir DIR` runs it;
`python -m mimo_jax.train.plot --workdir DIR` draws its loss curves.
"""
