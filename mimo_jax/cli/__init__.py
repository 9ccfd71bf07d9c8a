"""The command-line programs, one module per command: flags, printing and exit codes only; the
work is done by the library modules each one names.

    python -m mimo_jax.train.pretrain     cli/pretrain.py         -> mimo_jax.train.trainer
    python -m mimo_jax.train.plot         cli/plot.py             -> mimo_jax.train.curves
    python -m mimo_jax.generate           cli/generate.py         -> mimo_jax.loading, inference
    python -m mimo_jax.summary            cli/summary.py          -> mimo_jax.model.param_count
    python -m mimo_jax.plan               cli/plan.py             -> mimo_jax.train.memory_plan
    python -m mimo_jax.data.to_array_record  cli/to_array_record.py -> mimo_jax.data.token_shards

The module paths on the left stay what users and launch scripts type; each only calls the
command's `main(argv)`. A command module defines its absl flags when imported, so import one per
process (`main` parses them and exits, as `python -m` does).
"""
