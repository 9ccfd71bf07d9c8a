"""Input pipeline on Grain: sources, tokenizer, packing, mixtures, batches.

The seqio adapter (`mimo_jax.data.seqio_adapter`) imports seqio (and with it TensorFlow) only when
a `seqio:` source is opened, so the core install does not need TensorFlow.
"""

from mimo_jax.data.config import DataConfig, SourceSpec, data_config_from_dict, parse_sources
from mimo_jax.data.errors import DataError
from mimo_jax.data.packing import PackIterDataset, pack_documents
from mimo_jax.data.pipeline import (BATCH_KEYS, OpenedSource, ProcessShard, eval_batches,
                                    open_sources, resolve_tokenizer, train_batches)
from mimo_jax.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe

__all__ = [
    "BATCH_KEYS", "DataConfig", "DataError", "OpenedSource", "PackIterDataset", "ProcessShard",
    "SourceSpec", "TextTokenizer", "data_config_from_dict", "eval_batches", "load_tokenizer",
    "open_sources", "pack_documents", "parse_sources", "resolve_tokenizer", "train_batches",
    "train_bpe",
]
