r"""XManager launch script for pretraining: this machine, a multi-host TPU slice, or GPU hosts.

    # This machine (in Docker through XManager when Docker is present, else a local process):
    python launch/pretrain.py --config=configs/tiny.py --workdir=/tmp/mimo_tiny \
        --override=train.steps=50
    # A v5p-512 slice on GKE: 64 hosts x 4 chips, one JobSet; the memory plan must fit first:
    python launch/pretrain.py --executor=tpu --slice=v5p-512 --topology=8x8x4 \
        --config=configs/mimo_v2_flash.py --workdir=gs://BUCKET/mimo \
        --image=gcr.io/PROJECT/mimo-jax:latest
    # Any of these with --dry_run prints the plan (commands, resources, config, manifests) as JSON.

`xmanager launch launch/pretrain.py -- <flags>` runs it the same way. The flags and what each
executor does: `launch/launcher.py`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import launcher  # noqa: E402  (needs the repository root on the path)

if __name__ == "__main__":
    launcher.main_for("pretrain")
