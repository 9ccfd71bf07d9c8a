r"""`python -m mimo_jax.eval.long_context`: long-context evaluation of a trained model.

    python -m mimo_jax.eval.long_context --checkpoint runs/tiny
    python -m mimo_jax.eval.long_context --checkpoint runs/tiny --lengths 128,256,512 \
        --depths 0.1,0.5,0.9 --needles 4 --samples 16 --out runs/tiny/long_context

Two synthetic retrieval tasks in held-out text (`mimo_jax.eval.context_tasks`): niah_multi
(several "magic_<key> = <value>" needles, one queried) and multi_hop (a chain of assignments
whose last variable is queried), scored by teacher-forced exact match of the answer (the same
verdict as greedy decoding, from one forward pass), at each length and depth; and held-out
perplexity by log-spaced position bucket at each length. The lengths default to the trained
`data.seq_len` (from the run's config.json) and 2x and 4x it. It prints the tables and writes
long_context.json and the heat map long_context.png into --out (default <checkpoint>/long_context).
A bad path or argument ends with one line `error: ...` and exit status 1.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Sequence

from absl import app, flags, logging

from mimo_jax.cli import exit_after_run, run_command
from mimo_jax.eval import context_eval, context_report
from mimo_jax.loading import load_checkpoint

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Pretraining workdir or its params export.")
_LENGTHS = flags.DEFINE_string("lengths", "", "Comma-separated row lengths in tokens; empty = the "
                               "trained length and 2x and 4x it.")
_DEPTHS = flags.DEFINE_string("depths", "0.1,0.5,0.9", "Comma-separated needle depths in [0, 1].")
_NEEDLES = flags.DEFINE_integer("needles", 4, "Needles per niah_multi sample (one is queried).")
_HOPS = flags.DEFINE_integer("hops", 2, "Hops of a multi_hop chain.")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Samples per (task, length, depth) cell.")
_BUCKETS = flags.DEFINE_integer("buckets", 4, "Log-spaced perplexity buckets per length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic samples.")
_HELDOUT = flags.DEFINE_string("heldout", "", "Held-out data source (e.g. stdlib, "
                               "text:/data/eval/*.txt); empty = the run config's evaluation data.")
_OUT = flags.DEFINE_string("out", "", "Output directory (default <checkpoint>/long_context).")


def parse_list(flag: str, text: str, kind: type) -> list:
    """The comma-separated values of `--flag`, each read as `kind`; ValueError naming a bad one."""
    values = []
    for item in text.split(","):
        try:
            values.append(kind(item.strip()))
        except ValueError:
            raise ValueError(f"--{flag}={text!r}: {item.strip()!r} is not "
                             f"{'an integer' if kind is int else 'a number'}") from None
    return values


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{flag}={value} must be at least 1")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _CHECKPOINT.value:
        sys.exit("error: --checkpoint is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    try:
        depths = parse_list("depths", _DEPTHS.value, float)
        for depth in depths:
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"--depths: {depth} is not in [0, 1]")
        lengths = parse_list("lengths", _LENGTHS.value, int) if _LENGTHS.value else None
        for length in lengths or ():
            _positive("lengths", length)
        for name, flag in (("needles", _NEEDLES), ("hops", _HOPS), ("samples", _SAMPLES),
                           ("buckets", _BUCKETS), ("batch_size", _BATCH)):
            _positive(name, flag.value)
        model, params, tokenizer = load_checkpoint(_CHECKPOINT.value)
        config = context_eval.run_config(_CHECKPOINT.value)
        lengths = lengths or context_eval.default_lengths(config)
        documents = context_eval.heldout_documents(config, tokenizer, sources=_HELDOUT.value)
        results = context_eval.evaluate(
            model, params, tokenizer, documents, lengths=lengths, depths=depths,
            samples=_SAMPLES.value, needles=_NEEDLES.value, hops=_HOPS.value,
            buckets=_BUCKETS.value, batch_size=_BATCH.value, seed=_SEED.value,
            log=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as err:  # every error of bad input here is one (flags, checkpoint, data)
        exit_after_run(f"error: {err}")
    results["checkpoint"] = str(_CHECKPOINT.value)
    results["trained_length"] = context_eval.trained_length(config)
    out = pathlib.Path(_OUT.value or pathlib.Path(_CHECKPOINT.value) / "long_context")
    print(context_report.format_table(results))
    print(f"wrote {context_report.write_json(results, out)}")
    print(f"wrote {context_report.plot_heatmap(results, out)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
