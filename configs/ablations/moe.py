"""Dense against MoE at the same active FFN parameters per token, on the tiny model.

    python -m mimo_jax.ablate --sweep configs/ablations/moe.py --workdir runs/ablate_moe
"""

import ml_collections

from configs.ablations import points


def get_sweep() -> dict[str, ml_collections.ConfigDict]:
    """Point name -> run config."""
    return {"moe": points.base(), "dense": points.dense_ffn(points.base())}
