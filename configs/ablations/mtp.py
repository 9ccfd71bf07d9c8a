"""MTP ablation (report section 2.3): 0, 1 or 3 MTP heads trained with the tiny model.

    python -m mimo_jax.ablate --sweep configs/ablations/mtp.py --workdir runs/ablate_mtp

The table's eval loss is the main model's next-token loss in every point, so the heads' effect on
it is what the sweep compares (the report pretrains with one head and post-trains three).
"""

import ml_collections

from configs.ablations import points


def get_sweep() -> dict[str, ml_collections.ConfigDict]:
    """Point name -> run config."""
    return {f"mtp_{heads}": points.mtp_heads(points.base(), heads) for heads in (0, 1, 3)}
