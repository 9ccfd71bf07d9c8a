r"""Context extension of a small model on 2 CPU cores, measured by the long-context evaluation
(~15 minutes).

    python benchmarks/long_context.py [--workdir runs/long_context_demo]

The model is `configs/long_context_demo.py` (configs/tiny.py made smaller). Stages, each a run of
the project's pretraining trainer:
  1. short: 128-token rows from random initialisation, 400 steps, on the standard-library
     corpus mixed half and half (by sampling weight) with retrieval documents (below);
  2. long:  from stage 1's workdir (`init_from`), 100 steps of 512-token rows (4x, the same
     tokens per step), the global layers' RoPE theta raised from 640k to 5M (the stage-3 change,
     which the run lists), whole files packed, the same mixture with 4x longer retrieval
     documents;
  3. the long-context evaluation (`mimo_jax.eval.context_eval`) of both stages at 128, 256 and
     512 tokens, on held-out standard-library text: retrieval accuracy (mean over depths 0.1,
     0.5, 0.9), the answer ids' mean loss, and perplexity by position bucket over 512-token
     rows, printed as one table.

The retrieval documents are training-split standard-library text with the evaluation's facts
inserted at whole lines and its query and answer at the end (`context_tasks.draw_facts`: the
same formats, other keys and values), so that the format is not new to the model; the
evaluation's samples are built from held-out files. (At the default budget the model still
answers none exactly: copying a value from far back, an induction mechanism, takes far more
training than these ~500k tokens. The answer loss is the graded view; guessing uniformly among
the 900 three-digit values costs ln(900) / 2.54 ids = 2.67 nats per id with the demonstration's
tokenizer, and copying the value costs about 0.)
A stage whose export already exists in the workdir is reused (delete it to redo it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import jax
import numpy as np

# Run as a script from anywhere: the package and configs/ live one directory up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import long_context_demo  # noqa: E402  (needs the line above)
from mimo_jax.data import corpus  # noqa: E402
from mimo_jax.eval import context_eval, context_report, context_tasks  # noqa: E402
from mimo_jax.loading import load_checkpoint  # noqa: E402
from mimo_jax.train import trainer  # noqa: E402
from mimo_jax.train.checkpoint import EXPORT_DIR  # noqa: E402

DEPTHS = (0.1, 0.5, 0.9)
CHARS_PER_TOKEN = 3.5  # about what the demonstration's 4096-id BPE averages on Python source


def _needs_run(workdir: pathlib.Path) -> bool:
    """False when the stage's export exists (it is reused); else clears what a stopped run left."""
    if (workdir / EXPORT_DIR / "params").exists():
        print(f"reusing {workdir}")
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    return True


def retrieval_document(lines: list[str], rng: np.random.Generator) -> str:
    """`lines` of filler with one sample's facts (a random task, 1-4 needles or 1-3 hops)
    inserted between lines at drawn depths, then the query and its answer."""
    task = context_tasks.TASKS[int(rng.integers(len(context_tasks.TASKS)))]
    facts, later = context_tasks.draw_facts(task, rng, needles=int(rng.integers(1, 5)),
                                            hops=int(rng.integers(1, 4)))
    first = float(rng.uniform(0, 1))
    if task == context_tasks.MULTI_HOP:
        later = [first + (1 - first) * d for d in later]
    cuts = [round(d * len(lines)) for d in [first] + later]
    order = sorted(range(len(cuts)), key=lambda i: (cuts[i], i))
    pieces, done = [], 0
    for i in order:
        pieces.append("\n".join(lines[done:cuts[i]]))
        pieces.append("".join(facts.facts[i]))
        done = cuts[i]
    pieces.append("\n".join(lines[done:]))
    return "".join(pieces) + facts.query + facts.answer + "\n"


def write_documents(directory: pathlib.Path, count: int, tokens: int, seed: int) -> None:
    """`count` retrieval documents of about `tokens` tokens each, as text files, from
    training-split standard-library files."""
    if directory.is_dir() and len(list(directory.iterdir())) == count:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = corpus.stdlib_files("train", 5.0)
    chars = int(tokens * CHARS_PER_TOKEN * 0.7)  # the rest of the budget is facts and query
    written = 0
    while written < count:
        text = files[int(rng.integers(len(files)))].read_text(errors="replace")
        if len(text) < 2 * chars:
            continue
        start = int(rng.integers(0, len(text) - chars))
        lines = text[start:start + chars].split("\n")[1:-1]  # whole lines only
        (directory / f"{written:05d}.txt").write_text(retrieval_document(lines, rng))
        written += 1


def _mixture(documents: pathlib.Path, share: float) -> str:
    return f"stdlib@{1 - share:g},text:{documents}@{share:g}"


def _evaluate(workdir: pathlib.Path, lengths: list[int], args: argparse.Namespace) -> dict:
    model, params, tokenizer = load_checkpoint(workdir)
    config = context_eval.run_config(workdir)
    documents = context_eval.heldout_documents(config, tokenizer)
    results = context_eval.evaluate(model, params, tokenizer, documents, lengths=lengths,
                                    depths=DEPTHS, samples=args.samples, seed=args.seed,
                                    log=print)
    print(context_report.format_table(results))
    context_report.write_json(results, workdir / "long_context")
    context_report.plot_heatmap(results, workdir / "long_context")
    return results


def _table(before: dict, after: dict, lengths: list[int]) -> str:
    """One Markdown table: retrieval accuracy and answer loss per task and length, then perplexity
    per position bucket of the longest rows, before and after the extension."""
    lines = ["| measure | length | before extension | after extension |", "|---|---|---|---|"]
    for task in context_tasks.TASKS:
        for length in lengths:
            cells = [np.mean(list(r["accuracy"][task][str(length)].values()))
                     for r in (before, after)]
            lines.append(f"| {task} accuracy | {length} | {100 * cells[0]:.0f}% | "
                         f"{100 * cells[1]:.0f}% |")
        for length in lengths:
            losses = [r["answer_loss"][task][str(length)] for r in (before, after)]
            lines.append(f"| {task} answer loss (nats/id) | {length} | {losses[0]:.2f} | "
                         f"{losses[1]:.2f} |")
    longest = str(lengths[-1])
    edges = before["perplexity"][longest]["edges"]
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        cells = [r["perplexity"][longest]["perplexity"] for r in (before, after)]
        values = ["n/a" if c is None else f"{c[i]:.1f}" for c in cells]
        lines.append(f"| perplexity, positions {low}-{high} | {longest} | {values[0]} | "
                     f"{values[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--workdir", default="runs/long_context_demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short_steps", type=int, default=400)
    parser.add_argument("--long_steps", type=int, default=100)
    parser.add_argument("--share", type=float, default=0.5,
                        help="sampling weight of the retrieval documents in the mixture")
    parser.add_argument("--documents", type=int, default=2000,
                        help="retrieval documents per stage")
    parser.add_argument("--samples", type=int, default=8, help="samples per evaluation cell")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir).absolute()
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    short_len = long_context_demo.SHORT_LEN
    long_len = short_len * long_context_demo.EXTENSION
    lengths = [short_len, 2 * short_len, long_len]
    wall: dict[str, float] = {}

    start = time.perf_counter()
    write_documents(root / "data" / "short", args.documents, short_len, args.seed)
    write_documents(root / "data" / "long", args.documents // 4, long_len, args.seed + 1)
    wall["documents"] = time.perf_counter() - start

    short, long = root / "short", root / "long"
    start = time.perf_counter()
    if _needs_run(short):
        config = long_context_demo.short_config(args.short_steps)
        config.data.train_sources = _mixture(root / "data" / "short", args.share)
        trainer.run(config, short)
    wall["short stage"] = time.perf_counter() - start
    start = time.perf_counter()
    if _needs_run(long):
        config = long_context_demo.long_config(str(short), args.long_steps)
        config.data.train_sources = _mixture(root / "data" / "long", args.share)
        trainer.run(config, long)
    wall["long stage"] = time.perf_counter() - start
    start = time.perf_counter()
    before = _evaluate(short, lengths, args)
    after = _evaluate(long, lengths, args)
    wall["evaluation"] = time.perf_counter() - start

    print(f"\nlong-context evaluation before and after extending {short_len} -> {long_len} tokens "
          f"(GA theta 640k -> {long_context_demo.LONG_THETA:.0e}); {args.samples} samples a "
          f"(task, length, depth) cell, depths {', '.join(map(str, DEPTHS))}")
    print(_table(before, after, lengths))
    print("wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))
    (root / "table.json").write_text(json.dumps({"before": before, "after": after,
                                                 "wall_s": wall}, indent=2))


if __name__ == "__main__":
    main()
