"""Attention ablations (report section 2.1): window size, attention sinks, hybrid ratio.

    python -m mimo_jax.ablate --sweep configs/ablations/attention.py --workdir runs/ablate_attention

Six points over the tiny model (see points.py for the window scaling): the report's design
(5:1 hybrid, the scaled 128-key window, sinks) against a 4x larger window, each with and without
sinks, and against 3:1 and all-global layer patterns.
"""

import ml_collections

from configs.ablations import points


def get_sweep() -> dict[str, ml_collections.ConfigDict]:
    """Point name -> run config."""
    def point(size: int, sink: bool, swa_per_global: int = 5) -> ml_collections.ConfigDict:
        config = points.sinks(points.window(points.base(), size), sink)
        return points.hybrid_ratio(config, swa_per_global)

    return {
        "window_small_sinks": point(points.SMALL_WINDOW, True),
        "window_small_no_sinks": point(points.SMALL_WINDOW, False),
        "window_large_sinks": point(points.LARGE_WINDOW, True),
        "window_large_no_sinks": point(points.LARGE_WINDOW, False),
        "hybrid_3to1": point(points.SMALL_WINDOW, True, swa_per_global=3),
        "all_global": point(points.SMALL_WINDOW, True, swa_per_global=0),
    }
