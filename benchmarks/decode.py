r"""Decoding speed and memory: plain vs MTP self-speculative decoding, and the hybrid KV cache.

Prints these tables:
  1. tokens/s of plain greedy decoding vs speculative decoding with k = 1..M drafts on a trained
     checkpoint, the mean acceptance length (tokens per main-model pass) and the speedup, with a
     check that the speculative output equals the plain output token for token;
  2. the parts of a speculative step on that checkpoint: a main-model pass over 1..M+1 tokens
     and the drafting of k = 1..M tokens;
  3. KV-cache bytes of the full config at 4k / 32k / 256k context, hybrid (SWA rings + GA) vs
     every layer global, computed from the cache's real shapes (jax.eval_shape, nothing allocated);
  4. the time of one cached decode step of the tiny config at 1k / 8k / 32k context
     (`--step_batch` rows, default 1).

A checkpoint the heads can predict well comes from text with a lot of structure, e.g. the
generated repetitive code that `--write_corpus` produces:

    python benchmarks/decode.py --write_corpus /tmp/rep_code
    python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir /tmp/mimo_mtp3 \
        --config.model.num_mtp_heads=3 --config.data.train_sources=text:/tmp/rep_code/train \
        --config.data.eval_sources=text:/tmp/rep_code/eval --config.data.seq_len=128 \
        --config.data.batch_size=8 --config.train.steps=500
    python benchmarks/decode.py --checkpoint /tmp/mimo_mtp3 --prompts /tmp/rep_code/eval

Without --checkpoint only tables 3 and 4 are printed.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from anywhere: the package and configs/ live one directory up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import mimo_v2_flash, tiny  # noqa: E402  (needs the line above)
from mimo_jax.config import GA, model_config_from_dict, replace_model  # noqa: E402
from mimo_jax.inference import cache as kv_cache  # noqa: E402
from mimo_jax.inference import decode, speculative  # noqa: E402
from mimo_jax.inference.generation import generate  # noqa: E402
from mimo_jax.inference.sampling import SamplingConfig  # noqa: E402
from mimo_jax.inference.speculative import speculative_generate  # noqa: E402
from mimo_jax.loading import load_checkpoint  # noqa: E402
from mimo_jax.model.transformer import MiMoV2Flash, init_params  # noqa: E402

_WORDS = ("user", "name", "count", "total", "index", "value", "price", "order", "item", "size",
          "level", "score", "label", "owner", "state", "queue", "buffer", "limit", "offset",
          "weight", "height", "width", "color", "token", "record", "path", "mode", "flag", "rate",
          "delay", "retry", "stamp", "group", "field", "entry", "cache", "node", "edge", "port",
          "host")
_TYPES = ("int", "str", "float", "bool", "bytes", "list", "dict")


def _identifier(rng: random.Random, parts: int) -> str:
    return "_".join(rng.choice(_WORDS) for _ in range(parts))


def _class_source(rng: random.Random) -> str:
    """One generated Python class: fields, __init__, getters/setters, to_dict, __repr__."""
    name = "".join(w.capitalize() for w in _identifier(rng, 2).split("_"))
    fields = list(dict.fromkeys(_identifier(rng, rng.randint(1, 2))
                                for _ in range(rng.randint(3, 6))))
    types = {f: rng.choice(_TYPES) for f in fields}
    args = ", ".join(f"{f}: {types[f]}" for f in fields)
    lines = [f"class {name}:", f'    """A {name} record."""', "",
             f"    def __init__(self, {args}):"]
    lines += [f"        self._{f} = {f}" for f in fields]
    for f in fields:
        lines += ["", f"    def get_{f}(self) -> {types[f]}:", f"        return self._{f}", "",
                  f"    def set_{f}(self, value: {types[f]}) -> None:",
                  f"        self._{f} = value"]
    lines += ["", "    def to_dict(self) -> dict:", "        return {"]
    lines += [f'            "{f}": self._{f},' for f in fields]
    lines += ["        }", "", "    def __repr__(self) -> str:",
              f'        return f"{name}(' + ", ".join(f"{f}={{self._{f}!r}}" for f in fields)
              + ')"', ""]
    return "\n".join(lines) + "\n"


def write_corpus(directory: pathlib.Path, train_files: int = 3000, eval_files: int = 100) -> None:
    """Writes `train/` and `eval/` text files of generated classes (a different seed each)."""
    for split, count, seed in (("train", train_files, 0), ("eval", eval_files, 1)):
        rng = random.Random(seed)
        out = directory / split
        out.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            text = "\n\n".join(_class_source(rng) for _ in range(rng.randint(1, 3)))
            (out / f"module_{i:05d}.py.txt").write_text(text)
    print(f"wrote {train_files} train and {eval_files} eval files under {directory}")


def kv_cache_table(contexts: tuple[int, ...] = (4096, 32768, 262144)) -> list[str]:
    """Markdown rows: KV-cache bytes of configs/mimo_v2_flash.py, hybrid vs all-global."""
    config = model_config_from_dict(mimo_v2_flash.get_config().model)
    all_global = replace_model(config, layer_types=(GA,) * config.num_layers)
    rows = ["| context | hybrid (39 SWA rings of 129 + 9 GA) | all-global (48 GA) | hybrid / all-global "
            "| MTP head ring |",
            "|---|---|---|---|---|"]
    for context in contexts:
        hybrid = kv_cache.cache_bytes(kv_cache.cache_shapes(config, 1, context,
                                                            num_mtp_heads=0))
        full = kv_cache.cache_bytes(kv_cache.cache_shapes(all_global, 1, context,
                                                          num_mtp_heads=0))
        mtp = kv_cache.cache_bytes(kv_cache.cache_shapes(config, 1, context)["mtp"])
        rows.append(f"| {context // 1024}k | {_gib(hybrid)} | {_gib(full)} | "
                    f"{hybrid / full:.4f} | {_gib(mtp)} |")
    return rows


def greedy_step_loop(model: MiMoV2Flash, batch: int, first_position: int, steps: int):
    """A jitted `fn(params, decoder_cache) -> tokens [B, 1]`: `steps` cached greedy decode steps
    of `batch` rows, one token each, at positions first_position .. first_position + steps - 1."""
    def run(params, cache):
        def body(i, carry):
            cache, token = carry
            positions = jnp.full((batch, 1), first_position + i, jnp.int32)
            hidden, cache = decode.model_decode(model, params, token, positions, cache)
            token = jnp.argmax(decode.logits(model, params, hidden), -1).astype(jnp.int32)
            return cache, token
        return jax.lax.fori_loop(0, steps, body, (cache, jnp.ones((batch, 1), jnp.int32)))[1]
    return jax.jit(run)


def best_seconds(fn, args: tuple, rounds: int) -> float:
    """The fastest of `rounds` timed calls `fn(*args)`, after one untimed call that compiles: on
    a shared machine the minimum is the least disturbed measurement."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def step_time_table(contexts: tuple[int, ...], batch: int = 1, steps: int = 32) -> list[str]:
    """Markdown rows: one cached greedy decode step of configs/tiny.py (random weights, `batch`
    rows) with the sequence at each context length, i.e. global layers attending over that many
    keys."""
    model = MiMoV2Flash(model_config_from_dict(tiny.get_config().model))
    params = init_params(model, jax.random.key(0))
    rows = [f"| context | ms per decode step (batch {batch}) | tokens/s |", "|---|---|---|"]
    for context in contexts:
        cache = kv_cache.init_cache(model.config, batch, context, num_mtp_heads=0)["decoder"]
        fn = greedy_step_loop(model, batch, context - steps, steps)
        step = best_seconds(fn, (params, cache), rounds=3) / steps
        rows.append(f"| {context // 1024}k | {step * 1e3:.2f} | {batch / step:.0f} |")
    return rows


def _gib(num_bytes: int) -> str:
    if num_bytes >= 2 ** 30:
        return f"{num_bytes / 2 ** 30:.2f} GiB"
    return f"{num_bytes / 2 ** 20:.1f} MiB"


def _load_prompts(path: pathlib.Path | None, tokenizer, count: int, length: int):
    """`count` prompts of `length` tokens: file starts from `path` (a directory), else a fixed
    snippet repeated."""
    texts = []
    if path is not None:
        texts = [p.read_text() for p in sorted(path.iterdir()) if p.is_file()][:count]
    while len(texts) < count:
        texts.append(_class_source(random.Random(len(texts) + 100)))
    ids = [tokenizer.encode(t)[:length] for t in texts]
    short = [len(i) for i in ids if len(i) < length]
    if short:
        raise SystemExit(f"error: a prompt file has only {short[0]} tokens (< --prompt_len)")
    return np.stack(ids).astype(np.int32)


def speed_table(loaded: tuple, prompts_dir: str | None, batch: int, prompt_len: int,
                new_tokens: int, rounds: int, moe_impl: str, layers: str) -> list[str]:
    """Markdown rows: plain vs speculative greedy decoding of `new_tokens` tokens.

    Every variant is compiled first, then the variants run in turn for `rounds` rounds and each
    keeps its fastest time: on a shared machine the minimum is the least disturbed measurement.
    `loaded` is `load_checkpoint`'s (model, params, tokenizer).
    """
    model, params, tokenizer = loaded
    unstack = {"auto": None, "scanned": False, "unstacked": True}[layers]
    prompts = _load_prompts(pathlib.Path(prompts_dir) if prompts_dir else None, tokenizer,
                            batch, prompt_len)
    lengths = np.full((batch,), prompt_len, np.int32)
    variants = {"plain greedy": lambda: generate(model, params, prompts, lengths,
                                                 max_new_tokens=new_tokens,
                                                 unstack_layers=unstack)}
    for k in range(1, model.config.num_mtp_heads + 1):
        variants[f"speculative, k={k}"] = lambda k=k: speculative_generate(
            model, params, prompts, lengths, max_new_tokens=new_tokens, num_draft=k,
            unstack_layers=unstack)
    outputs, times = {}, {name: [] for name in variants}
    for name, run in variants.items():
        outputs[name] = run()
        jax.block_until_ready(outputs[name].tokens)  # compiles
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(run().tokens)
            times[name].append(time.perf_counter() - start)
    plain = outputs["plain greedy"]
    base = int(np.sum(plain.num_generated)) / min(times["plain greedy"])
    rows = ["| decoding | tokens/s (best) | tokens/s (median) | acceptance length | speedup "
            "| same tokens as plain |",
            "|---|---|---|---|---|---|"]
    for name, out in outputs.items():
        generated = int(np.sum(out.num_generated))
        best, median = generated / min(times[name]), generated / statistics.median(times[name])
        same = all(out.generated(b) == plain.generated(b) for b in range(batch))
        rows.append(f"| {name} | {best:.1f} | {median:.1f} | {out.acceptance_length():.2f} | "
                    f"{best / base:.2f}x | {'-' if out is plain else 'yes' if same else 'NO'} |")
    sample = tokenizer.decode(plain.generated(0)[:60])
    rows.append("")
    rows.append(f"batch {batch}, prompt {prompt_len} tokens, {new_tokens} new tokens per row, "
                f"moe_impl={moe_impl}, layers {layers}, {rounds} timed rounds after "
                f"compilation, backend {jax.default_backend()}; speedup from the best times")
    rows.append("first row's continuation: " + repr(sample))
    return rows


def step_parts_table(loaded: tuple, rounds: int, steps: int = 50) -> list[str]:
    """Markdown rows: the parts of a speculative step at batch 1 on the checkpoint, one module
    per layer: a main-model pass with the LM head over 1 .. K+1 tokens (the verification of k
    drafts covers k+1), and the drafting of k = 1 .. K tokens by the MTP heads
    (`speculative._draft`). Each part runs `steps` times inside one compiled loop; best of
    `rounds`. `loaded` is `load_checkpoint`'s (model, params, tokenizer)."""
    model, params, _ = loaded
    config, params = decode.loop_layout(model.config, params, True)
    model = MiMoV2Flash(config)
    heads = config.num_mtp_heads
    length = 512
    cache = kv_cache.init_cache(config, 1, length, extra_slots=max(heads - 1, 0),
                                num_mtp_heads=heads)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, length)),
                         jnp.int32)

    def best_time(run) -> float:
        return best_seconds(jax.jit(run), (params, cache), rounds) / steps

    def main_pass(width: int):
        def run(params, cache):
            def body(i, carry):
                decoder, total = carry
                positions = 100 + i + jnp.arange(width)[None]
                hidden, decoder = decode.model_decode(model, params, tokens[:, :width], positions,
                                                      decoder)
                # The logits feed the loop's result, so no part of the pass is dead code.
                return decoder, total + jnp.sum(decode.logits(model, params, hidden))
            return jax.lax.fori_loop(0, steps, body, (cache["decoder"], jnp.float32(0)))[1]
        return run

    def drafting(k: int):
        def run(params, cache):
            hidden = jnp.full((1, 2 * k, config.hidden_size), 0.1, jnp.float32)

            def body(i, carry):
                buffer, mtp = carry
                frontier = jnp.full((1,), 100, jnp.int32) + i
                buffer, _, heads_cache = speculative._draft(  # pylint: disable=protected-access
                    model, params, buffer, hidden, frontier - k + 1, frontier,
                    jnp.zeros((1,), bool), mtp[:k], jax.random.key(0), SamplingConfig())
                return buffer, heads_cache + mtp[k:]
            return jax.lax.fori_loop(0, steps, body, (tokens, cache["mtp"]))[0]
        return run

    rows = ["| part of a speculative step | µs |", "|---|---|"]
    for width in range(1, heads + 2):
        rows.append(f"| main model + LM head, {width} token(s) | "
                    f"{best_time(main_pass(width)) * 1e6:.0f} |")
    for k in range(1, heads + 1):
        rows.append(f"| drafting k={k} | {best_time(drafting(k)) * 1e6:.0f} |")
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write_corpus", help="write the generated repetitive-code corpus here "
                                               "and exit")
    parser.add_argument("--checkpoint", help="a training workdir or its params export")
    parser.add_argument("--prompts", help="directory of text files whose starts are the prompts")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--moe_impl", default="auto",
                        help="MoE dispatch for decoding (auto: the project's default, which reads "
                             "only the chosen experts at batch 1)")
    parser.add_argument("--layers", choices=("auto", "scanned", "unstacked"), default="auto",
                        help="decode the checkpoint's scanned runs as they are, or as one module "
                             "per layer (auto: unstacked on CPU, see decode.loop_layout)")
    parser.add_argument("--step_contexts", default="1024,8192,32768",
                        help="context lengths of the decode-step timing (tiny config)")
    parser.add_argument("--step_batch", type=int, default=1,
                        help="rows of the decode-step timing")
    args = parser.parse_args(argv)
    if args.write_corpus:
        write_corpus(pathlib.Path(args.write_corpus))
        return
    if args.checkpoint:
        loaded = load_checkpoint(args.checkpoint, moe_impl=args.moe_impl)
        print("\n".join(speed_table(loaded, args.prompts, args.batch, args.prompt_len,
                                    args.new_tokens, args.rounds, args.moe_impl, args.layers)))
        print()
        print("\n".join(step_parts_table(loaded, args.rounds)))
        print()
    print("\n".join(kv_cache_table()))
    print()
    print("\n".join(step_time_table(tuple(int(c) for c in args.step_contexts.split(",")),
                                     args.step_batch)))


if __name__ == "__main__":
    main(sys.argv[1:])
