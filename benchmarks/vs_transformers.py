r"""This project against transformers' `MiMoV2FlashForCausalLM` on the same random weights.

    python benchmarks/vs_transformers.py                        # issue 11's shape, 8 x 512, CPU
    python benchmarks/vs_transformers.py --batch 2 --seq 64 --layers 2 --new_tokens 16 --repeats 2
    python benchmarks/vs_transformers.py --experts 32 --top_k 8
    python benchmarks/vs_transformers.py --backend gpu          # project on the accelerator

One process: a transformers model is built from `MiMoV2FlashConfig(...)` with a fixed seed, saved
with `save_pretrained`, and read back with `mimo_jax.convert.hf.load(dir, dtype="float32",
param_dtype="float32")`, so both sides hold the same float32 weights. Each measure is compiled
(or warmed up) once on both sides, then runs alternately, project then transformers, for
`--repeats` rounds; the table shows the median rates:

  train step   tokens/s of one optimizer step on batch x seq random tokens. Project: the
               trainer's own jitted step (`mimo_jax.train.trainer.step_program`, the tiny config's
               train settings: forward, backward, clipping, AdamW, router-bias update).
               transformers: eager forward with labels, backward, `clip_grad_norm_(1.0)`, torch
               AdamW with the same learning rate, betas, eps and weight decay.
               MFU = model FLOPs (`mimo_jax.train.flops`, 3 x forward) / time / peak, where the
               peak is a 2048^3 float32 matmul timed in jax on the project's device (on an
               accelerator also the vendor's dense bf16 figure).
  forward      tokens/s of the logits of batch x seq tokens (no gradient).
  greedy b1    new tokens/s of greedy decoding of one prompt, `--new_tokens` tokens (prefill
               included), and whether both sides chose the same tokens.
  sampled b32  new tokens/s of `--sample_batch` prompts sampled at temperature 1 (no top-k,
               no top-p) against transformers `generate(do_sample=True)`.

Both models are trained on copies, so every measure sees the saved weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Callable

# Run as a script from anywhere: the package and configs/ live one directory up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM  # noqa: E402

from configs import tiny  # noqa: E402
from mimo_jax.convert import hf  # noqa: E402
from mimo_jax.inference.generation import generate  # noqa: E402
from mimo_jax.inference.sampling import SamplingConfig  # noqa: E402
from mimo_jax.train import partition  # noqa: E402
from mimo_jax.train.flops import flops_per_token  # noqa: E402
from mimo_jax.train.state import TrainState  # noqa: E402
from mimo_jax.train.trainer import build_configs, step_program  # noqa: E402
from train_throughput import PEAK_TFLOPS  # noqa: E402  (benchmarks/: the vendor peak table)

MEASURES = ("train", "forward", "greedy", "sample")


@dataclasses.dataclass
class Row:
    """One line of the table: a rate on each side (higher is better) and a note."""

    measure: str
    project: float
    reference: float
    unit: str
    note: str = ""


@dataclasses.dataclass
class Sides:
    """The same weights on both sides, and the inputs every measure shares."""

    args: argparse.Namespace
    torch_model: MiMoV2FlashForCausalLM
    device: torch.device
    model: object  # mimo_jax MiMoV2Flash
    params: dict
    tokens: np.ndarray  # [B, T] int32


def reference_config(args: argparse.Namespace) -> MiMoV2FlashConfig:
    """Issue 11's transformers config, with the shape options applied."""
    config = MiMoV2FlashConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=1,
        head_dim=96, v_head_dim=64, moe_intermediate_size=256, n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k, sliding_window=129)
    # The eager attention is the one that applies the sinks.
    config._attn_implementation = "eager"  # pylint: disable=protected-access
    return config


def load_project_model(directory: str, moe_impl: str):
    """`hf.load` as a user calls it; `moe_impl` overrides its dispatch choice when given."""
    overrides = {"moe_impl": moe_impl} if moe_impl else {}
    return hf.load(directory, dtype="float32", param_dtype="float32", **overrides)


def build_sides(args: argparse.Namespace, directory: str) -> Sides:
    """A seeded random transformers model, saved and read back by the project."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.backend == "gpu" and torch.cuda.is_available()
                          else "cpu")
    torch_model = MiMoV2FlashForCausalLM(reference_config(args)).eval()
    torch_model.save_pretrained(directory)
    torch_model.to(device)
    model, params = load_project_model(directory, args.moe_impl)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, model.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    return Sides(args, torch_model, device, model, params, tokens)


def alternate(project: Callable[[], object], reference: Callable[[], object],
              repeats: int) -> tuple[float, float]:
    """Median seconds of each side over `repeats` alternating runs, after one untimed run each
    (compilation, warm-up). A callable returns once its work is finished."""
    project()
    reference()
    times = ([], [])
    for _ in range(repeats):
        for side, run in enumerate((project, reference)):
            start = time.perf_counter()
            run()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_peak_tflops() -> float:
    """float32 2048^3 matmul rate of jax's default device, in TFLOP/s."""
    n, runs = 2048, 5
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(runs):
        out = matmul(a)
    out.block_until_ready()
    return 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e12


def vendor_peak_tflops() -> float | None:
    """The vendor's dense bf16 TFLOP/s of an accelerator in benchmarks/train_throughput.py's
    table; None on CPU or an unknown device."""
    kind = jax.devices()[0].device_kind
    for name, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return tflops
    return None


def measure_train(sides: Sides, peaks: dict[str, float]) -> Row:
    """The trainer's step against eager torch forward + backward + clipping + AdamW."""
    args = sides.args
    run_config = tiny.get_config()
    run_config.data.batch_size, run_config.data.seq_len = args.batch, args.seq
    configs = dataclasses.replace(build_configs(run_config), model=sides.model.config)
    parallelism = partition.make_parallelism(configs.mesh, configs.train.num_devices)
    partition.check_batch(args.batch, args.seq, configs.train.grad_accum_steps, parallelism)
    program = step_program(configs, parallelism, seed=args.seed)

    def initial_state(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=program.optimizer.init(params),
                          rng=jax.random.PRNGKey(args.seed))

    # The step donates its state: train on a copy, keep the loaded weights for the other measures.
    params_copy = jax.tree.map(jnp.copy, sides.params)
    state = jax.jit(initial_state, out_shardings=program.state_shardings)(params_copy)
    batch = program.global_batch(
        {"tokens": sides.tokens, "segment_ids": np.ones_like(sides.tokens),
         "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))},
        parallelism)
    learning_rate = np.float32(configs.train.learning_rate)
    holder = {"state": state}

    def project():
        holder["state"], metrics = program.train_step(holder["state"], batch, learning_rate)
        jax.block_until_ready((holder["state"], metrics))

    train = configs.train
    torch_model = copy.deepcopy(sides.torch_model).train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=train.learning_rate,
                                  betas=(train.adam_b1, train.adam_b2), eps=train.adam_eps,
                                  weight_decay=train.weight_decay)
    labels = torch.tensor(sides.tokens, dtype=torch.long, device=sides.device)

    def reference():
        optimizer.zero_grad(set_to_none=True)
        loss = torch_model(input_ids=labels, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), train.clip_norm)
        optimizer.step()
        _sync(sides.device)

    project_s, reference_s = alternate(project, reference, args.repeats)
    tokens = args.batch * args.seq
    model_flops = flops_per_token(sides.model.config, args.seq).train * tokens
    mfu = ", ".join(f"MFU vs {name}: {100 * model_flops / project_s / (peak * 1e12):.1f} % "
                    f"(transformers {100 * model_flops / reference_s / (peak * 1e12):.1f} %)"
                    for name, peak in peaks.items())
    return Row("train step (fwd + bwd + AdamW)", tokens / project_s, tokens / reference_s,
               "tokens/s", mfu)


def measure_forward(sides: Sides) -> Row:
    """Logits of batch x seq tokens, no gradient."""
    model, args = sides.model, sides.args
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                               segment_ids=jnp.ones_like(t)).logits)
    tokens = jnp.asarray(sides.tokens)
    torch_tokens = torch.tensor(sides.tokens, dtype=torch.long, device=sides.device)

    def project():
        forward(sides.params, tokens).block_until_ready()

    def reference():
        with torch.no_grad():
            sides.torch_model(input_ids=torch_tokens, use_cache=False)
        _sync(sides.device)

    project_s, reference_s = alternate(project, reference, args.repeats)
    count = args.batch * args.seq
    return Row("forward", count / project_s, count / reference_s, "tokens/s")


def _prompts(sides: Sides, batch: int) -> np.ndarray:
    """[batch, prompt_len] int32: the first tokens of the benchmark rows, cycled."""
    rows = [sides.tokens[i % sides.tokens.shape[0], :sides.args.prompt_len]
            for i in range(batch)]
    return np.stack(rows)


def _generation(sides: Sides, prompts: np.ndarray, sampling: SamplingConfig,
                do_sample: bool) -> tuple[Callable, Callable, dict]:
    """(project run, transformers run, their last outputs) for one generation workload."""
    new_tokens = sides.args.new_tokens
    lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
    torch_prompts = torch.tensor(prompts, dtype=torch.long, device=sides.device)
    outputs = {}

    def project():
        out = generate(sides.model, sides.params, prompts, lengths, max_new_tokens=new_tokens,
                       sampling=sampling, rng=jax.random.key(sides.args.seed))
        jax.block_until_ready(out.tokens)
        outputs["project"] = out

    def reference():
        sample_options = dict(temperature=1.0, top_k=0, top_p=1.0) if do_sample else {}
        outputs["reference"] = sides.torch_model.generate(
            torch_prompts, attention_mask=torch.ones_like(torch_prompts),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=do_sample,
            pad_token_id=0, **sample_options)
        _sync(sides.device)

    return project, reference, outputs


def measure_greedy(sides: Sides) -> Row:
    """Greedy decoding of one prompt, and whether both sides chose the same tokens."""
    prompts = _prompts(sides, 1)
    project, reference, outputs = _generation(sides, prompts, SamplingConfig(), False)
    project_s, reference_s = alternate(project, reference, sides.args.repeats)
    ours = outputs["project"].generated(0)
    theirs = outputs["reference"][0, prompts.shape[1]:].tolist()
    same = sum(a == b for a, b in zip(ours, theirs))
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    note = f"greedy tokens agree: {same} of {len(theirs)}"
    if first_diff is not None:
        note += f" (first difference at new token {first_diff})"
    count = sides.args.new_tokens
    return Row("greedy decoding, batch 1", count / project_s, count / reference_s,
               "new tokens/s", note)


def measure_sampling(sides: Sides) -> Row:
    """Temperature-1 sampling of `--sample_batch` prompts (the post-training rollout)."""
    batch = sides.args.sample_batch
    prompts = _prompts(sides, batch)
    project, reference, _ = _generation(sides, prompts, SamplingConfig(temperature=1.0), True)
    project_s, reference_s = alternate(project, reference, sides.args.repeats)
    count = batch * sides.args.new_tokens
    return Row(f"sampled generation, batch {batch}, temperature 1", count / project_s,
               count / reference_s, "new tokens/s")


def _runtime(config, name: str):
    """A runtime setting of the model config (nested under `runtime` where the config has one)."""
    return getattr(getattr(config, "runtime", config), name)


def print_table(sides: Sides, rows: list[Row], peaks: dict[str, float]) -> None:
    args, config = sides.args, sides.model.config
    num_params = sum(p.numel() for p in sides.torch_model.parameters())
    print(f"shape: {args.layers} layers, {args.experts} experts top-{args.top_k}, "
          f"{num_params / 1e6:.1f}M parameters; batch {args.batch} x {args.seq}; prompts of "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens; median of {args.repeats}")
    print(f"project: jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({jax.default_backend()}), moe_impl={_runtime(config, 'moe_impl')}, "
          f"attention_impl={_runtime(config, 'attention_impl')}; "
          f"transformers eager on {sides.device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    print("peaks: " + ", ".join(f"{name} {peak:.3f} TFLOP/s" for name, peak in peaks.items()))
    print()
    print("| measure | this project | transformers eager | ratio | notes |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.measure}, {row.unit} | {row.project:,.0f} | {row.reference:,.0f} | "
              f"{row.project / row.reference:.2f}x | {row.note} |")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="rows of the train/forward batch")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--sample_batch", type=int, default=32, help="rows of sampled generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per measure")
    parser.add_argument("--backend", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: the project on the accelerator, transformers on CUDA when "
                             "torch has it")
    parser.add_argument("--moe_impl", default="", help="override hf.load's MoE dispatch")
    parser.add_argument("--measures", default=",".join(MEASURES),
                        help=f"comma-separated subset of {MEASURES}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.measures = args.measures.split(",")
    unknown = [m for m in args.measures if m not in MEASURES]
    if unknown:
        parser.error(f"--measures: unknown {unknown}; choose from {MEASURES}")
    if not 1 <= args.top_k <= args.experts:
        parser.error(f"--top_k={args.top_k} must be in [1, --experts={args.experts}]")
    if not 1 <= args.prompt_len <= args.seq:
        parser.error(f"--prompt_len={args.prompt_len} must be in [1, --seq={args.seq}]")
    for name in ("batch", "layers", "new_tokens", "sample_batch", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # Backends start lazily, so the platform can still be chosen here.
    jax.config.update("jax_platforms", args.backend)
    with tempfile.TemporaryDirectory() as directory:
        sides = build_sides(args, directory)
    peaks = {"measured f32 matmul": measured_peak_tflops()}
    vendor = vendor_peak_tflops()
    if vendor is not None:
        peaks["vendor bf16 dense"] = vendor
    rows = []
    if "train" in args.measures:
        rows.append(measure_train(sides, peaks))
    if "forward" in args.measures:
        rows.append(measure_forward(sides))
    if "greedy" in args.measures:
        rows.append(measure_greedy(sides))
    if "sample" in args.measures:
        rows.append(measure_sampling(sides))
    print_table(sides, rows, peaks)


if __name__ == "__main__":
    main(sys.argv[1:])
