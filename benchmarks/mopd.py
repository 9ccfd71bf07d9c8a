r"""Multi-teacher on-policy distillation against its alternatives, on 2 CPU cores (~30 minutes).

    python benchmarks/mopd.py [--workdir runs/mopd_demo]

Two domains whose answers the project checks itself (`mimo_jax.eval.tasks`): addition of
numbers below 100 and sorting 3-6 letters, prompts drawn with fixed seeds, held-out test
prompts never trained on. The stages, each a run of the project's own trainers:
  1. the student: SFT from a random initialisation on both domains, stopped early (weak on
     both): its learning-rate schedule is planned for --student_schedule steps and the run
     stops after --student_steps, as a training run caught half-way;
  2. a teacher per domain: SFT of the student on that domain only;
  3. from the student, the same number of steps, prompts and samples (so the same number of
     sampled responses) for each variant:
       MOPD                   teacher term + outcome reward (alpha 1)
       MOPD without ORM       teacher term only (alpha 0)
       ORM-only RL (GRPO)     outcome reward only (no teacher)
       SFT on teacher outputs the teachers sample the responses (same prompts, same count,
                              same temperature and top-p) and the student is fine-tuned
                              on them with the same number of updates at the same peak
                              learning rate (off-policy);
  4. greedy held-out accuracy of every model on the same test prompts, printed as one table.

A stage that finished in the workdir is reused (delete its directory to redo it).
The models share one persistent compilation cache in the workdir.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from typing import Callable

import jax
import numpy as np

# Run as a script from anywhere: the package and configs/ live one directory up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import mopd_demo  # noqa: E402  (needs the line above)
from mimo_jax.config import model_config_from_dict  # noqa: E402
from mimo_jax.data.prompts import PromptStream, prompt_pool  # noqa: E402
from mimo_jax.data.tokenizer import TextTokenizer, train_bpe  # noqa: E402
from mimo_jax.eval.task_eval import task_accuracy  # noqa: E402
from mimo_jax.eval.tasks import extract_answer, get_task, write_sft_jsonl  # noqa: E402
from mimo_jax.inference.rollout import rollout  # noqa: E402
from mimo_jax.inference.sampling import SamplingConfig  # noqa: E402
from mimo_jax.model.transformer import MiMoV2Flash  # noqa: E402
from mimo_jax.train import init_from, mopd_trainer, sft_trainer  # noqa: E402
from mimo_jax.train.mopd_step import encode_prompts, response_texts  # noqa: E402

# Every byte a prompt or an answer can hold; `train_bpe` at 258 ids learns no merges from it.
ALPHABET = "0123456789+=:abcdefghijklmnopqrstuvwxyz\n"
MOPD_VARIANTS = {  # name -> mopd section overrides
    "MOPD": dict(use_teacher=True, alpha=1.0),
    "MOPD without ORM": dict(use_teacher=True, alpha=0.0),
    "ORM-only RL (GRPO)": dict(use_teacher=False, alpha=1.0),
}
OFF_POLICY = "SFT on teacher outputs"
# The demonstration's MOPD settings and model, read once (a run's config is built fresh).
SETTINGS = mopd_demo.get_config()
MODEL_CONFIG = model_config_from_dict(SETTINGS.model)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


STAGE_DONE = "stage_done"  # written in a stage's workdir once the stage is complete


def _needs_run(workdir: pathlib.Path) -> bool:
    """False when the stage finished before (it is reused); else clears what a stopped run
    left."""
    if (workdir / STAGE_DONE).exists():
        print(f"reusing {workdir}")
        return False
    shutil.rmtree(workdir, ignore_errors=True)
    return True


def _stage_done(workdir: pathlib.Path) -> None:
    (workdir / STAGE_DONE).touch()


def _stop_after(steps: int) -> Callable[[], bool]:
    """A `stop_requested` for the trainers: true from the `steps`-th call on (the loop asks once
    after every step), so the run saves its checkpoint at step `steps` and stops there."""
    calls = 0

    def stop_requested() -> bool:
        nonlocal calls
        calls += 1
        return calls >= steps

    return stop_requested


def _write_data(root: pathlib.Path, args: argparse.Namespace) -> tuple[TextTokenizer, dict]:
    """The byte tokenizer and each domain's (and the mixture's) SFT training file."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe([ALPHABET], mopd_demo.VOCAB_SIZE, len(ALPHABET))
    tokenizer.save(root / "tokenizer.json")
    files, mixture = {}, []
    for domain in mopd_demo.DOMAINS:
        examples = get_task(domain).examples(args.seed, args.sft_examples)
        files[domain] = write_sft_jsonl(root / f"{domain}.jsonl", examples)
        mixture += examples
    np.random.default_rng(args.seed).shuffle(mixture)
    files["mixture"] = write_sft_jsonl(root / "mixture.jsonl", mixture)
    return tokenizer, files


def _sft(workdir: pathlib.Path, train_file: pathlib.Path, tokenizer_file: pathlib.Path,
         init: str, steps: int, learning_rate: float, stop_after: int | None = None) -> None:
    """An SFT stage of `steps` steps (its schedule's length), stopped after `stop_after`."""
    if not _needs_run(workdir):
        return
    config = mopd_demo.sft_config(str(train_file), str(tokenizer_file), init, steps,
                                  learning_rate)
    stop = _stop_after(stop_after) if stop_after else lambda: False
    sft_trainer.run(config, workdir, stop_requested=stop)
    _stage_done(workdir)


def _mopd(workdir: pathlib.Path, student: pathlib.Path, teachers: dict[str, pathlib.Path],
          overrides: dict, args: argparse.Namespace) -> None:
    if not _needs_run(workdir):
        return
    config = mopd_demo.get_config()
    config.init_from = str(student)
    mopd = config.mopd
    mopd.update(overrides)
    if mopd.use_teacher:
        mopd.teachers = ",".join(f"{d}={t}" for d, t in teachers.items())
    mopd.seed = args.seed
    train = config.train
    train.steps = train.checkpoint_every = args.steps
    # --learning_rate scales the config's whole schedule: its decay keeps its end-to-peak ratio.
    train.end_learning_rate *= args.learning_rate / train.learning_rate
    train.learning_rate = args.learning_rate
    train.log_every = 1  # every step's record: the sampled-token count is summed
    mopd_trainer.run(config, workdir)
    _stage_done(workdir)


def _load(workdir: pathlib.Path) -> tuple[MiMoV2Flash, object]:
    """A stage's model and parameters: its workdir's newest checkpoint (the student's is the one
    it stopped at)."""
    source = init_from.locate(str(workdir), MODEL_CONFIG)
    return MiMoV2Flash(source.model_config), init_from.load_params(source, source.model_config)


def _teacher_outputs(path: pathlib.Path, teachers: dict[str, pathlib.Path],
                     tokenizer: TextTokenizer, args: argparse.Namespace) -> dict:
    """The teachers answer exactly the prompts the MOPD runs sample from (same stream, same
    count, same temperature and top-p); returns how many responses and tokens they sampled.
    Outputs saved under other settings (sampling, or the arguments that make the teachers and
    the prompt stream) are sampled again, not reused."""
    mopd = SETTINGS.mopd
    settings = {key: value for key, value in vars(args).items()
                if key not in ("workdir", "eval_prompts", "learning_rate")}
    settings.update({key: mopd[key] for key in ("temperature", "top_p", "prompts_per_domain",
                                                  "samples_per_prompt", "max_response_tokens")})
    count_file = path.with_suffix(".count.json")
    if path.exists() and count_file.exists():
        saved = json.loads(count_file.read_text())
        if saved.get("settings") == settings:
            return saved["count"]
    per_domain, samples = mopd.prompts_per_domain, mopd.samples_per_prompt
    pools = {d: prompt_pool("task", d, seed=args.seed) for d in mopd_demo.DOMAINS}
    stream = PromptStream(pools, per_domain, args.seed)
    prompts = {d: [] for d in mopd_demo.DOMAINS}
    for _ in range(args.steps):
        batch = next(stream)
        for domain, examples in zip(batch.domains, batch.examples):
            prompts[domain] += [prompt for prompt, _ in examples]
    sampling = SamplingConfig(temperature=mopd.temperature, top_p=mopd.top_p)
    records, tokens = [], 0
    key = jax.random.key(args.seed)
    for domain, domain_prompts in prompts.items():
        model, params = _load(teachers[domain])
        for start in range(0, len(domain_prompts), 64):
            chunk = domain_prompts[start:start + 64]
            ids, lengths = encode_prompts(tokenizer, chunk, mopd.max_prompt_tokens)
            key, sub = jax.random.split(key)
            sample = rollout(model, params, ids, lengths, samples_per_prompt=samples,
                             max_new_tokens=mopd.max_response_tokens, sampling=sampling, rng=sub,
                             stop_tokens=(tokenizer.eos_id,))
            tokens += int(np.asarray(sample.response_mask).sum())
            texts = response_texts(tokenizer, sample)
            records += [(prompt, extract_answer(text))
                        for prompt, text in zip(np.repeat(chunk, samples), texts)]
    write_sft_jsonl(path, records)
    count = {"responses": len(records), "tokens": tokens}
    count_file.write_text(json.dumps({"settings": settings, "count": count}))
    return count


def _sampled(workdir: pathlib.Path) -> dict:
    """Responses and tokens an MOPD run sampled, from its per-step metrics records."""
    mopd = SETTINGS.mopd
    rows = mopd.prompts_per_domain * mopd.samples_per_prompt  # per domain per step
    records = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "response_length/" + mopd_demo.DOMAINS[0] in record:
            records[record["step"]] = record  # a resumed run's repeated step counts once
    tokens = sum(record[f"response_length/{d}"] * rows for record in records.values()
                 for d in mopd_demo.DOMAINS)
    return {"responses": len(records) * rows * len(mopd_demo.DOMAINS), "tokens": round(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/mopd_demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft_examples", type=int, default=4000,
                        help="training examples per domain for the SFT stages")
    parser.add_argument("--student_schedule", type=int, default=800,
                        help="the length the student's learning-rate schedule is planned for")
    parser.add_argument("--student_steps", type=int, default=520,
                        help="the student stops after this many steps of its schedule")
    parser.add_argument("--teacher_steps", type=int, default=200)
    parser.add_argument("--sft_learning_rate", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=SETTINGS.train.steps,
                        help="steps of every variant")
    parser.add_argument("--learning_rate", type=float, default=SETTINGS.train.learning_rate,
                        help="the variants' learning rate after their warm-up")
    parser.add_argument("--eval_prompts", type=int, default=256,
                        help="held-out prompts per domain")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir).absolute()
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    wall: dict[str, float] = {}

    def timed(name, fn, *fn_args):
        start = time.perf_counter()
        out = fn(*fn_args)
        wall[name] = wall.get(name, 0.0) + time.perf_counter() - start
        return out

    tokenizer, files = _write_data(root / "data", args)
    tokenizer_file = root / "data" / "tokenizer.json"
    student = root / "student"
    timed("student before", _sft, student, files["mixture"], tokenizer_file, "",
          args.student_schedule, args.sft_learning_rate, args.student_steps)
    teachers = {d: root / f"teacher_{d}" for d in mopd_demo.DOMAINS}
    for domain, workdir in teachers.items():
        timed(f"teacher ({domain})", _sft, workdir, files[domain], tokenizer_file,
              str(student), args.teacher_steps, args.sft_learning_rate)
    variants, sampled = {}, {}
    for name, overrides in MOPD_VARIANTS.items():
        variants[name] = root / _slug(name)
        timed(name, _mopd, variants[name], student, teachers, overrides, args)
        sampled[name] = _sampled(variants[name])
    outputs = root / "data" / "teacher_outputs.jsonl"
    sampled[OFF_POLICY] = timed(OFF_POLICY, _teacher_outputs, outputs, teachers, tokenizer, args)
    variants[OFF_POLICY] = root / _slug(OFF_POLICY)
    timed(OFF_POLICY, _sft, variants[OFF_POLICY], outputs, tokenizer_file,
          str(student), args.steps, args.learning_rate)

    rows = {f"teacher ({d})": w for d, w in teachers.items()}
    rows["student before"] = student
    rows.update(variants)
    tests = {d: get_task(d).examples(args.seed, args.eval_prompts, "test")
             for d in mopd_demo.DOMAINS}
    max_new = SETTINGS.mopd.max_response_tokens
    accuracy = {}
    for name, workdir in rows.items():
        model, params = _load(workdir)
        accuracy[name] = {d: task_accuracy(model, params, tokenizer, examples,
                                           max_new_tokens=max_new)
                          for d, examples in tests.items()}
    _print_table(accuracy, sampled, wall, args)


def _print_table(accuracy: dict, sampled: dict, wall: dict, args: argparse.Namespace) -> None:
    """One row per model: accuracy per domain, and for the student and the variants each
    domain's accuracy as a share of that domain's teacher."""
    domains = mopd_demo.DOMAINS
    teacher = {d: accuracy[f"teacher ({d})"][d] for d in domains}
    print(f"\nHeld-out greedy accuracy ({args.eval_prompts} test prompts per domain); variants: "
          f"{args.steps} steps from the student, lr {args.learning_rate:g}")
    print("| model | " + " | ".join(domains) + " | "
          + " | ".join(f"{d} / teacher" for d in domains)
          + " | responses sampled | tokens sampled | wall s |")
    print("|---" * (2 * len(domains) + 4) + "|")
    for name, acc in accuracy.items():
        shares = ["" if name.startswith("teacher") else f"{acc[d] / teacher[d]:.0%}"
                  if teacher[d] else "-" for d in domains]
        count = sampled.get(name, {})
        print(f"| {name} | " + " | ".join(f"{acc[d]:.3f}" for d in domains) + " | "
              + " | ".join(shares) + f" | {count.get('responses', '')} | "
              f"{count.get('tokens', '')} | {wall.get(name, 0.0):.0f} |")
    print("\ncommand: python benchmarks/mopd.py " + " ".join(
        f"--{k}={v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
