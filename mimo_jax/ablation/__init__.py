"""Ablation sweeps: named run configs trained in turn (`sweep`), compared in one table (`table`).

    python -m mimo_jax.ablate --sweep configs/ablations/attention.py --workdir DIR
    python -m mimo_jax.ablate --table DIR
"""
