r"""XManager launch script for an ablation sweep: one job (work unit) per sweep point.

    python launch/sweep.py --config=configs/ablations/attention.py --workdir=/tmp/ablate
    python launch/sweep.py --executor=gpu --slice=8xH100 --config=configs/ablations/mtp.py \
        --workdir=gs://BUCKET/ablate --image=gcr.io/PROJECT/mimo-jax:latest --points=mtp_0,mtp_3

Each point trains into `<workdir>/<experiment id>/<point>`; `python -m mimo_jax.ablate --table
<workdir>/<experiment id>` then collects them. Flags as in `launch/pretrain.py`, with --config
naming the sweep file; --dry_run prints the plan.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import launcher  # noqa: E402  (needs the repository root on the path)

if __name__ == "__main__":
    launcher.main_for("sweep")
