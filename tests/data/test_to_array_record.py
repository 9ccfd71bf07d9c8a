"""The `python -m mimo_jax.data.to_array_record` command, run as users run it."""

import json
import subprocess
import sys

import numpy as np

from mimo_jax.data import pipeline
from mimo_jax.data.config import data_config_from_dict


def run_command(*args):
    return subprocess.run([sys.executable, "-m", "mimo_jax.data.to_array_record", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_text_to_shards_and_back(text_dir, tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    out = tmp_path / "shards"
    result = run_command(f"--input={text_dir}", "--format=text", f"--output_dir={out}",
                         f"--tokenizer={tmp_path / 'tokenizer.json'}", "--records_per_shard=16")
    assert result.returncode == 0, result.stderr
    assert "wrote 40 documents" in result.stdout
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["num_records"] == 40 and len(metadata["shards"]) == 3
    assert metadata["vocab_size"] == 300 and metadata["tokenizer_sha256"] == tokenizer.fingerprint()

    cfg = data_config_from_dict(dict(train_sources=f"array_record:{out}", seq_len=64,
                                     batch_size=2, shuffle=False))
    sources = pipeline.open_sources(cfg, "train")
    documents = sources[0].documents
    for i, path in enumerate(sorted(text_dir.glob("doc*.txt"))):
        want = np.append(tokenizer.encode(path.read_text()), tokenizer.eos_id)
        np.testing.assert_array_equal(documents[i], want)
    # Without data.tokenizer, a run reads the tokenizer saved beside the shards.
    found = pipeline.resolve_tokenizer(cfg, 300, None, sources)
    assert found.fingerprint() == tokenizer.fingerprint()

    again = run_command(f"--input={text_dir}", f"--output_dir={out}")
    assert again.returncode == 1 and "already holds a conversion; pass --overwrite" in again.stderr


def test_bad_input_is_one_line(tmp_path):
    result = run_command(f"--input={tmp_path}/missing/*.txt", f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: text input path '{tmp_path}/missing/*.txt' matches no files")
