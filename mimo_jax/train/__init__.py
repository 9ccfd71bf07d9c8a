"""Training: the loop and its hooks; pretraining's config, optimizer, losses, steps, checkpoints.

`python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir DIR` runs it;
`python -m mimo_jax.train.plot --workdir DIR` draws its loss curves.
"""
