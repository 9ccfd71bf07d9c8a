r"""`python -m mimo_jax.generate`: generates text from a trained model, streaming it as it is
decoded.

    python -m mimo_jax.generate --checkpoint /tmp/mimo_tiny --prompt "def main():"
    python -m mimo_jax.generate --checkpoint /tmp/mimo_tiny --prompt "class A:" --speculative
    python -m mimo_jax.generate --hf /path/to/hf_dir --prompt "Hello" --temperature 0.8 --top_p 0.95
    python -m mimo_jax.generate --checkpoint /tmp/mimo_tiny --prompt "x" --mesh tensor=2,expert=4

`--checkpoint` takes a pretraining workdir (its `export/` params export is read) or the export
directory itself; `--hf` a Hugging Face directory (config.json, safetensors, tokenizer.json).
At the end it prints the decode speed in tokens/s (streaming: from the first generated token to the
last, so compilation and prefill are not counted; --nostream: a second, compiled run timed whole)
and, with `--speculative`, the mean acceptance length: tokens per main-model pass, 1 + accepted
drafts. `--mesh` decodes over a mesh of this host's devices (`--rules` picks the logical rule
preset): heads and experts split as in training, the prompt copied into every row that the batch
axes split (row 0 is printed). A bad path or argument ends with one line `error: ...` and exit
status 1.

Loading is `mimo_jax.loading.load_checkpoint` / `mimo_jax.convert.hf.load`, decoding
`mimo_jax.inference.generation.generate` / `mimo_jax.inference.speculative.speculative_generate`;
this module adds the printing and the timing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from mimo_jax.cli import exit_after_run, run_command
from mimo_jax.convert import hf
from mimo_jax.data.tokenizer import TextTokenizer, load_tokenizer
from mimo_jax.inference.generation import generate
from mimo_jax.inference.on_mesh import batch_shards
from mimo_jax.inference.sampling import SamplingConfig
from mimo_jax.inference.speculative import speculative_generate
from mimo_jax.loading import load_checkpoint
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import Parallelism, mesh_config_from_dict

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Pretraining workdir or its params export.")
_HF = flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory with tokenizer.json.")
_PROMPT = flags.DEFINE_string("prompt", None, "The text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
_SPECULATIVE = flags.DEFINE_boolean("speculative", False,
                                    "Draft with the MTP heads, verify with the main model.")
_NUM_DRAFT = flags.DEFINE_integer("num_draft", 0, "Drafts per step (0 = every MTP head).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_string("dtype", "", "Compute dtype override (e.g. float32, bfloat16).")
_MOE_IMPL = flags.DEFINE_string("moe_impl", "", "MoE dispatch override (auto, dense, ragged, "
                                "blocked, gathered); empty = the checkpoint's (auto picks the "
                                "fastest for the backend).")
_MESH = flags.DEFINE_string("mesh", "", "Decode over a mesh of this host's devices, sizes per "
                            "axis (e.g. tensor=2,expert=4; axes data, fsdp, expert, context, "
                            "tensor); empty = one device.")
_RULES = flags.DEFINE_string("rules", "fsdp_tp_ep", "Logical rule preset with --mesh.")
_STREAM = flags.DEFINE_boolean(
    "stream", True, "Print tokens as they are decoded (a host callback per step, which costs "
    "time on a busy machine); --nostream prints at the end and times a second, compiled run.")


class _Streamer:
    """Prints row 0's new tokens as they arrive, decoding the whole text so far each time (so that
    multi-byte characters split across tokens print correctly), and notes when they arrive."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""
        self.first_time: float | None = None
        self.first_count = 0

    def __call__(self, tokens, counts) -> None:
        if self.first_time is None:
            self.first_time, self.first_count = time.perf_counter(), int(counts[0])
        self.ids.extend(int(t) for t in tokens[0, :int(counts[0])])
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def run(model, params, tokenizer: TextTokenizer, prompt: str, *, max_new_tokens: int,
        speculative: bool, num_draft: int, sampling: SamplingConfig, seed: int,
        stream: bool = True, parallelism: Parallelism | None = None) -> dict[str, float]:
    """Generates (streaming or not) and prints the text; returns the measured figures.

    Streaming: decode speed counts the tokens after the first one (which the prefill produces)
    over the time from its arrival to the end, so compilation and prefill are not in it.
    Not streaming: a first run compiles, a second is timed whole (prefill included).
    With `parallelism`, the prompt fills every row the batch axes split (row 0 is printed).
    """
    ids = tokenizer.encode(prompt)
    if ids.size == 0:
        raise ValueError(f"--prompt {prompt!r} encodes to no tokens; give some text")
    rows = 1 if parallelism is None else batch_shards(parallelism)
    prompts = np.repeat(ids[None].astype(np.int32), rows, axis=0)
    lengths = np.full((rows,), ids.size, np.int32)
    stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, sampling=sampling,
                                  rng=jax.random.key(seed), stop_tokens=stops,
                                  parallelism=parallelism)
    if speculative:
        kwargs["num_draft"] = num_draft or None
    fn = speculative_generate if speculative else generate
    streamer = _Streamer(tokenizer)
    if stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        kwargs["stream"] = streamer
    else:
        jax.block_until_ready(fn(model, params, prompts, lengths, **kwargs).tokens)
    start = time.perf_counter()
    out = fn(model, params, prompts, lengths, **kwargs)
    jax.block_until_ready(out.tokens)
    jax.effects_barrier()  # every streamed callback has run
    end = time.perf_counter()
    if not stream:
        sys.stdout.write(prompt)
    sys.stdout.write(tokenizer.decode(out.generated(0))[len(streamer.printed):] + "\n")
    generated = int(out.num_generated[0])
    if stream and streamer.first_time is not None:
        first, counted = streamer.first_time, generated - streamer.first_count
    else:
        first, counted = start, generated
    return {"tokens": generated, "first_token_s": first - start,
            "tokens_per_s": counted / max(end - first, 1e-9),
            "acceptance": out.acceptance_length()}


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(_CHECKPOINT.value) == bool(_HF.value):
        sys.exit("error: give exactly one of --checkpoint DIR and --hf DIR")
    if _PROMPT.value is None:
        sys.exit("error: --prompt is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    try:
        sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
        parallelism = None
        if _MESH.value:
            parallelism = Parallelism.from_config(mesh_config_from_dict(
                dict(ici=_MESH.value, dcn="", rules=_RULES.value)))
        overrides = {key: flag.value for key, flag in (("dtype", _DTYPE), ("moe_impl", _MOE_IMPL))
                     if flag.value}
        # On a mesh the parameters are read straight into their shardings.
        if _CHECKPOINT.value:
            model, params, tokenizer = load_checkpoint(_CHECKPOINT.value, parallelism,
                                                       **overrides)
        else:
            shardings = None
            if parallelism is not None:
                config = hf.read_config(_HF.value, **overrides)
                _, shardings = parallelism.param_shardings(MiMoV2Flash(config))
            model, params = hf.load(_HF.value, shardings=shardings, **overrides)
            tokenizer = load_tokenizer(_HF.value)
        figures = run(model, params, tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                      speculative=_SPECULATIVE.value, num_draft=_NUM_DRAFT.value,
                      sampling=sampling, seed=_SEED.value, stream=_STREAM.value,
                      parallelism=parallelism)
    except ValueError as err:  # every error of bad input here is one (config, checkpoint, data)
        exit_after_run(f"error: {err}")
    if _STREAM.value:
        line = (f"{figures['tokens']} tokens; first after {figures['first_token_s']:.2f} s "
                f"(compilation and prefill), then {figures['tokens_per_s']:.1f} tokens/s")
    else:
        line = (f"{figures['tokens']} tokens: {figures['tokens_per_s']:.1f} tokens/s "
                "(prefill included, compilation not)")
    if _SPECULATIVE.value:
        line += f", mean acceptance length {figures['acceptance']:.2f}"
    print(line, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
