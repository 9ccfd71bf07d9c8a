"""Frozen, validated configuration of supervised fine-tuning (the `sft` section of a run config).

The rest of an SFT run config is a pretraining one's (`model`, `data`, `train`, `mesh`), plus
the top-level `init_from` (see `mimo_jax.train.init_from`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mimo_jax.config_reader import Section, one_of, option, read_section
from mimo_jax.data.sft import TOO_LONG



@dataclasses.dataclass(frozen=True, kw_only=True)
class SftConfig(Section):
    """What SFT adds to a training run.

    copy_mtp_head: when `init_from`'s model has fewer MTP heads than `model.num_mtp_heads`,
      keep its heads and start each extra one as a copy of head 0 (the report copies the one
      pretrained head into 3 for post-training; they then train jointly). Off: the head counts
      must match like every other architecture field.
    too_long: an example longer than `data.seq_len` is dropped (and counted) or stops the run.
    """

    SECTION = "sft"

    copy_mtp_head: bool = option(False)
    too_long: str = option("drop", check=one_of(TOO_LONG))


def sft_config_from_dict(cfg: Any) -> SftConfig:
    """Builds and validates an `SftConfig` from the `sft` section (None: the defaults)."""
    return read_section(SftConfig, cfg)


