r"""XManager launch script for supervised fine-tuning (`python -m mimo_jax.train.sft`).

    python launch/sft.py --config=configs/sft_tiny.py --workdir=/tmp/mimo_sft
    python launch/sft.py --executor=tpu --slice=v5p-128 --topology=4x4x4 \
        --config=configs/sft_mimo_v2_flash.py --workdir=gs://BUCKET/sft \
        --override=init_from=gs://BUCKET/pretrain/export --image=gcr.io/PROJECT/mimo-jax:latest

Flags and executors as in `launch/pretrain.py` (`launch/launcher.py`); --dry_run prints the plan.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import launcher  # noqa: E402  (needs the repository root on the path)

if __name__ == "__main__":
    launcher.main_for("sft")
