"""XManager launch scripts (`pretrain.py`, `sft.py`, `mopd.py`, `sweep.py`) over one launcher
(`launcher.py`), and what they build on: the command line of a job (`jobs.py`), where it runs
(`cluster.py`: TPU slices and GPU hosts), and its Kubernetes manifest (`k8s.py`)."""
