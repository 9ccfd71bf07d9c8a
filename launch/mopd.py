r"""XManager launch script for multi-teacher on-policy distillation (`python -m mimo_jax.train.mopd`).

    python launch/mopd.py --config=configs/mopd_tiny.py --workdir=/tmp/mimo_mopd
    python launch/mopd.py --executor=gpu --slice=1xH200 --config=configs/mopd_mimo_v2_flash.py \
        --workdir=gs://BUCKET/mopd --image=gcr.io/PROJECT/mimo-jax:latest \
        --override=init_from=gs://BUCKET/sft/export

MOPD runs on the devices of one host (its rewards read every sampled row there), so a multi-host
slice is refused. Flags and executors as in `launch/pretrain.py`; --dry_run prints the plan.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import launcher  # noqa: E402  (needs the repository root on the path)

if __name__ == "__main__":
    launcher.main_for("mopd")
