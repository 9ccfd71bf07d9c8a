"""Long-context evaluation of a trained model: retrieval accuracy by length and depth on the
synthetic tasks (`context_tasks`) and held-out perplexity by position bucket, all scored from one
compiled forward pass per length (`context_scoring`).

    results = evaluate(model, params, tokenizer, documents, lengths=[128, 256, 512],
                       depths=[0.1, 0.5, 0.9], samples=8, seed=0)

The held-out documents come from the training run's saved config (`heldout_documents`): the
evaluation split of its data, whole files, tokenised in order. They serve as the haystack's
filler and, those at least a length long, as the perplexity rows (each row a document's first
L ids, so a position is a position within a document).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from mimo_jax.data.config import data_config_from_dict, parse_sources
from mimo_jax.data.pipeline import open_sources
from mimo_jax.data.tokenizer import TextTokenizer
from mimo_jax.eval import context_scoring, context_tasks
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.train.checkpoint import EXPORT_DIR

# The run config a pretraining workdir keeps (`mimo_jax.train.trainer.CONFIG_FILE`; importing the
# trainer for its name would load its logging stack, seconds at every start of the command).
CONFIG_FILE = "config.json"
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_EXTENSIONS = (1, 2, 4)  # default lengths: these multiples of the trained length


def run_config(checkpoint: str | pathlib.Path) -> dict | None:
    """The training run's saved config (`config.json` of the workdir, or of the export's parent
    directory), or None when there is none (e.g. a bare export)."""
    directory = pathlib.Path(checkpoint)
    for candidate in (directory, directory.parent if directory.name == EXPORT_DIR else None):
        if candidate is not None and (candidate / CONFIG_FILE).is_file():
            return json.loads((candidate / CONFIG_FILE).read_text())
    return None


def trained_length(config: dict | None) -> int | None:
    """The `data.seq_len` a run trained at, or None when its config is not known."""
    value = (config or {}).get("data", {}).get("seq_len")
    return int(value) if value else None


def default_lengths(config: dict | None) -> list[int]:
    """The trained length and `DEFAULT_EXTENSIONS` multiples of it; raises ValueError when the
    run's config is not known (then lengths must be given)."""
    length = trained_length(config)
    if length is None:
        raise ValueError("the checkpoint has no run config.json to read the trained length from; "
                         "give --lengths")
    return [length * k for k in DEFAULT_EXTENSIONS]


def heldout_documents(config: dict | None, tokenizer: TextTokenizer, *, sources: str = "",
                      max_tokens: int = 200_000) -> list[np.ndarray]:
    """Token ids of held-out documents, in order, until they hold `max_tokens` ids in all.

    sources: a data-source spec (e.g. "stdlib", "text:/data/eval/*.txt") read as evaluation
    data; "" = the run config's evaluation data (its `data.eval_sources`, else the held-out
    split of its train sources). Files are read whole (the run's `max_document_bytes` cut is
    not applied), so long documents stay long. Raises ValueError when there is nothing to read.
    """
    if sources:
        data = {"train_sources": sources, "eval_sources": sources, "seq_len": 2, "batch_size": 1}
    elif config is not None and "data" in config:
        data = dict(config["data"])
    else:
        raise ValueError("the checkpoint has no run config.json naming its data; give --heldout "
                         "(e.g. stdlib or text:/path/*.txt)")
    parse_sources(data["train_sources"], "data.train_sources")  # names a bad spec
    data_config = dataclasses.replace(data_config_from_dict(data), max_document_bytes=0)
    out, total = [], 0
    for source in open_sources(data_config, "eval"):
        for index in range(len(source.documents)):  # a random-access source: indexed
            document = source.documents[index]
            ids = (tokenizer.encode(document) if isinstance(document, str)
                   else np.asarray(document, np.int32))
            if ids.size:
                out.append(ids)
                total += ids.size
            if total >= max_tokens:
                return out
    if not out:
        raise ValueError("the held-out data holds no text")
    return out


def _check(lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    for length in lengths:
        if length < 16:
            raise ValueError(f"length {length} is too short for a retrieval sample (at least 16)")
    for depth in depths:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is not in [0, 1]")
    if samples < 1:
        raise ValueError(f"samples={samples} must be at least 1")


def evaluate(model: MiMoV2Flash, params: Any, tokenizer: TextTokenizer,
             documents: Sequence[np.ndarray], *, lengths: Sequence[int],
             depths: Sequence[float] = DEFAULT_DEPTHS, samples: int = 8, needles: int = 4,
             hops: int = 2, buckets: int = 4, batch_size: int = 8, seed: int = 0,
             log: Callable[[str], None] = lambda line: None) -> dict:
    """Retrieval accuracy and bucketed perplexity at each length (a JSON-ready dict).

    accuracy[task][str(length)][str(depth)]: share of `samples` samples answered exactly.
    answer_loss[task][str(length)]: mean loss (nats per id) of the answer ids, over all depths.
    perplexity[str(length)]: {"edges": bucket edges, "perplexity": one per bucket, "rows": the
    number of held-out documents at least `length` long that were scored (at most `samples`
    * `batch_size`); perplexity is None when none is that long}.
    """
    _check(lengths, depths, samples)
    stream = np.concatenate([np.append(d, tokenizer.eos_id or 0) for d in documents])
    forward = context_scoring.forward_fn(model)
    accuracy: dict = {task: {} for task in context_tasks.TASKS}
    answer_loss: dict = {task: {} for task in context_tasks.TASKS}
    perplexity: dict = {}
    for length in lengths:
        for task in context_tasks.TASKS:
            cells = [context_tasks.make_samples(task, tokenizer, stream, length, depth, samples,
                                                seed=seed, needles=needles, hops=hops)
                     for depth in depths]
            flat = [s for cell in cells for s in cell]
            rows = np.stack([s.tokens for s in flat])
            starts = np.asarray([s.answer_start for s in flat])
            predictions, nll = context_scoring.run_rows(forward, params, rows, batch_size)
            correct = context_scoring.answers_correct(predictions, rows, starts)
            accuracy[task][str(length)] = {
                str(depth): float(correct[i * samples:(i + 1) * samples].mean())
                for i, depth in enumerate(depths)}
            answer_loss[task][str(length)] = float(
                context_scoring.answer_loss(nll, starts).mean())
            log(f"{task} at {length}: " + " ".join(
                f"{d}={v:.2f}" for d, v in accuracy[task][str(length)].items()))
        edges = context_scoring.bucket_edges(length, buckets)
        long_docs = [d[:length] for d in documents if d.size >= length][:samples * batch_size]
        entry: dict = {"edges": edges, "rows": len(long_docs), "perplexity": None}
        if long_docs:
            _, nll = context_scoring.run_rows(forward, params, np.stack(long_docs), batch_size)
            entry["perplexity"] = context_scoring.bucket_perplexity(nll, edges)
        perplexity[str(length)] = entry
        log(f"perplexity at {length} over {len(long_docs)} rows: {entry['perplexity']}")
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples,
            "needles": needles, "hops": hops, "seed": seed, "accuracy": accuracy,
            "answer_loss": answer_loss, "perplexity": perplexity}
