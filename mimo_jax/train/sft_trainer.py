"""Supervised fine-tuning: prompt/response pairs, loss on the responses, from trained parameters.

`run(config, workdir)` is what `python -m mimo_jax.train.sft` calls. It is the pretraining
trainer with three things changed, and the training loop, step program, checkpoints, metrics
and hooks shared (`trainer.train`):
  data          `data.train_sources` (and `data.eval_sources`) are `jsonl:GLOB` files of
                {"prompt", "response"} records (`mimo_jax.data.sft`): each example packed whole,
                the loss on its response tokens only (the step sees the batch's `loss_mask`).
  first state   a fresh run starts from `init_from`'s parameters (`mimo_jax.train.init_from`)
                with a new optimizer state, step 0 and the data from its beginning; without
                `init_from`, from a random initialisation. A workdir that already holds a
                checkpoint of this run resumes from it instead, and `init_from` is not read.
  metrics       `zero_grad_params`, the report's stability metric: trained parameters whose
                gradient is exactly zero, in each record and on the progress line.
The tokenizer is `data.tokenizer` or, when that is empty, the one saved beside the init
parameters; when both exist they must be the same.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from mimo_jax.config_reader import fail
from mimo_jax.data import pipeline
from mimo_jax.data.config import DataConfig, SourceSpec, format_sources
from mimo_jax.data.errors import DataError
from mimo_jax.data.sft import SFT_KEYS, SftRecords, sft_batches, sft_rows
from mimo_jax.data.sources import expand_paths
from mimo_jax.data.tokenizer import TextTokenizer, load_tokenizer
from mimo_jax.train import batch_ramp, init_from, partition, trainer
from mimo_jax.train.checkpoint import Checkpointer, architecture
from mimo_jax.train.sft_config import SftConfig, sft_config_from_dict
from mimo_jax.train.trainer import RunResult, RunSetup

__all__ = ["SFT_RECORD_KEYS", "check_config", "open_records", "run", "sft_eval_batches"]

ZERO_GRADS = "zero_grad_params"
SFT_RECORD_KEYS = trainer.TRAIN_RECORD_KEYS + (ZERO_GRADS,)
COPY_MTP_OPTION = "sft.copy_mtp_head"


def _check_sources(sources: tuple[SourceSpec, ...], key: str) -> None:
    """SFT reads `jsonl:` files only, concatenated (a mixture weight would be ignored)."""
    for spec in sources:
        if spec.kind != "jsonl":
            fail(key, format_sources(sources), f"SFT reads 'jsonl:GLOB' files of prompt/response "
                 f"records; {spec.kind!r} is not one")
        if spec.weight != 1.0:
            fail(key, format_sources(sources), "SFT concatenates its sources; give no @weight")


def open_records(sources: tuple[SourceSpec, ...]) -> SftRecords | None:
    """One record set over every file of the `jsonl:` sources (None for no sources)."""
    if not sources:
        return None
    paths = [path for spec in sources for path in expand_paths(spec.arg, "SFT data")]
    return SftRecords(paths, name=",".join(spec.arg for spec in sources))


def _local_batch_size(batch_size: int, shard: pipeline.ProcessShard) -> int:
    if batch_size % shard.count:
        raise DataError(f"data.batch_size={batch_size} does not divide over {shard.count} "
                        "processes")
    return batch_size // shard.count


def sft_eval_batches(records: SftRecords, tokenizer: TextTokenizer, config: DataConfig,
                     too_long: str, shard: pipeline.ProcessShard = pipeline.ProcessShard()
                     ) -> Iterator[dict[str, np.ndarray]]:
    """`config.eval_batches` fixed per-process batches of the held-out examples, in file order,
    the same every call; once the examples run out, batches are padding (no loss)."""
    local = _local_batch_size(config.batch_size, shard)
    rows = iter(sft_rows(records, tokenizer, config.seq_len, shuffle=False, num_epochs=1,
                         add_eos=config.add_eos, too_long=too_long, shard=shard))
    for _ in range(config.eval_batches):
        batch = {key: np.zeros((local, config.seq_len), np.int32) for key in SFT_KEYS}
        batch["tokens"][:] = tokenizer.pad_id
        for r in range(local):
            row = next(rows, None)
            if row is None:
                break
            for key in SFT_KEYS:
                batch[key][r] = row[key]
        yield batch


def _data_stream(config: DataConfig, sft: SftConfig,
                 shard: pipeline.ProcessShard) -> dict[str, Any]:
    """The settings a saved SFT data position depends on (JSON-ready)."""
    stream = {key: getattr(config, key)
              for key in ("seq_len", "batch_size", "shuffle", "seed", "add_eos")}
    stream.update(train_sources=format_sources(config.train_sources), too_long=sft.too_long,
                  process_count=shard.count)
    return stream


def _tokenizer(config: DataConfig, workdir: pathlib.Path, source: init_from.InitSource | None,
               vocab_size: int, save: bool) -> TextTokenizer:
    """The run's tokenizer: the one this workdir saved (a restarted run keeps its ids), else
    `data.tokenizer`, else the one beside the init parameters; checked against the latter."""
    saved = workdir / pipeline.TOKENIZER_FILE
    if saved.is_file():
        tokenizer = load_tokenizer(saved)
    elif config.tokenizer:
        tokenizer = load_tokenizer(config.tokenizer)
    elif source is not None and source.tokenizer_file is not None:
        tokenizer = load_tokenizer(source.tokenizer_file)
    else:
        raise DataError("SFT needs a tokenizer: set data.tokenizer, or init_from a directory "
                        "that holds a tokenizer.json")
    if source is not None:
        init_from.check_tokenizer(source, tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"tokenizer {tokenizer.source!r} has {tokenizer.vocab_size} ids but "
                        f"model.vocab_size={vocab_size}")
    if config.add_eos and tokenizer.eos_id is None:
        raise DataError(f"tokenizer {tokenizer.source!r} has no end-of-text token to end "
                        "responses with; add one or set data.add_eos=False")
    if save and not saved.is_file():
        tokenizer.save(saved)
    return tokenizer


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        stop_requested: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = print) -> RunResult:
    """Fine-tunes (or resumes fine-tuning) as `config` says, in `workdir`."""
    configs = trainer.build_configs(config)
    sft = sft_config_from_dict(config.get("sft"))
    init_path = init_from.init_from_path(config)
    init_from.refuse_optimizer_carry(config, "SFT")
    batch_ramp.refuse(configs.train, "SFT")
    model_cfg, data_cfg, train_cfg = configs.model, configs.data, configs.train
    _check_sources(data_cfg.train_sources, "data.train_sources")
    _check_sources(data_cfg.eval_sources, "data.eval_sources")
    workdir = pathlib.Path(workdir).absolute()
    is_first = jax.process_index() == 0
    if is_first:
        workdir.mkdir(parents=True, exist_ok=True)
        trainer.save_config(config, workdir)

    parallelism = partition.make_parallelism(configs.mesh, train_cfg.num_devices)
    partition.check_batch(data_cfg.batch_size, data_cfg.seq_len, train_cfg.grad_accum_steps,
                          parallelism)
    shard = pipeline.ProcessShard.from_jax()
    # Data first: a bad path or an empty file fails in seconds, before any compilation.
    train_records = open_records(data_cfg.train_sources)
    eval_records = open_records(data_cfg.eval_sources) if data_cfg.eval_batches else None
    log(f"data: {len(train_records):,} SFT examples in {train_records.name}"
        + (f"; {len(eval_records):,} held out in {eval_records.name}" if eval_records else ""))

    checkpointer = Checkpointer(workdir, train_cfg)
    batches = None
    try:  # the checkpointer's background threads are stopped however the run ends
        start = checkpointer.latest_step() or 0
        source = None
        if start:
            if init_path:
                log(f"resuming from checkpoint step {start}; init_from={init_path!r} is not read")
        elif init_path:
            source = init_from.locate(init_path, model_cfg)
            # Before any compilation: a model of another architecture fails in seconds.
            init_from.check_architecture(source, model_cfg, copy_mtp_head=sft.copy_mtp_head,
                                         copy_option=COPY_MTP_OPTION)
            log(f"init_from: {source.describe()}")
        else:
            log("init_from is empty: the parameters start from a random initialisation")
        tokenizer = _tokenizer(data_cfg, workdir, source, model_cfg.vocab_size, save=is_first)
        log(f"tokenizer: {tokenizer.source} ({tokenizer.vocab_size} ids)")
        meta = {"architecture": architecture(model_cfg), "tokenizer": tokenizer.fingerprint(),
                "data_stream": _data_stream(data_cfg, sft, shard)}
        local_batch = _local_batch_size(data_cfg.batch_size, shard)
        batches = trainer.resume_batches(checkpointer, start, meta, lambda: iter(sft_batches(
            train_records, tokenizer, data_cfg.seq_len, local_batch, seed=data_cfg.seed,
            shuffle=data_cfg.shuffle, add_eos=data_cfg.add_eos, too_long=sft.too_long,
            shard=shard)))
        if start < train_cfg.steps:
            batches.read_ahead()  # the first batch before any compilation: bad data fails fast
        eval_batches = None
        if eval_records is not None:
            eval_batches = lambda: sft_eval_batches(  # noqa: E731
                eval_records, tokenizer, data_cfg, sft.too_long, shard)
        setup = RunSetup(configs, workdir, parallelism, checkpointer, meta, start,
                         initial_state=trainer.params_initial_state(
                             source, train_cfg.seed, log, copy_mtp_head=sft.copy_mtp_head),
                         eval_batches=eval_batches, record_keys=SFT_RECORD_KEYS,
                         progress_keys=(ZERO_GRADS,), count_zero_grads=True)
        return trainer.train(setup, batches, stop_requested, log)
    finally:
        if batches is not None:
            batches.close()
        checkpointer.close()


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check `run` makes of the config alone (sections, values, source kinds), without
    touching the disk; raises `ConfigError` naming the key."""
    configs = trainer.build_configs(config)
    sft_config_from_dict(config.get("sft"))
    init_from.init_from_path(config)
    _check_sources(configs.data.train_sources, "data.train_sources")
    _check_sources(configs.data.eval_sources, "data.eval_sources")

