"""The notebooks run top to bottom in a fresh kernel, with small numbers in their parameters
cell, and their results hold: falling loss and generated text, logits that match transformers,
a tabulated sweep, a post-training run."""

import json
import pathlib

import jax
import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
# A compact micro model for the ablation and post-training notebooks' runs (they compile once per
# point or stage; the numbers only shrink, the code path is the notebook's own).
SMALL_MODEL = {"model.num_layers": "2", "model.hidden_size": "32", "model.num_experts": "4",
               "model.num_experts_per_token": "2", "model.num_mtp_heads": "1",
               "data.seq_len": "32", "data.batch_size": "4", "data.eval_batches": "1",
               "data.tokenizer_train_bytes": "200000"}
POST_TRAINING_MODEL = {"model.num_layers": 2, "model.hidden_size": 32, "model.num_experts": 4,
                       "model.moe_intermediate_size": 32, "model.dense_intermediate_size": 64}
SMALL_RUN = {**SMALL_MODEL, "train.eval_every": "3", "train.steps": "3",
             "train.checkpoint_every": "3", "train.log_every": "1"}


def run_notebook(name: str, parameters: str, probe: str, monkeypatch) -> dict:
    """Executes notebooks/<name> with `parameters` appended to its parameters cell, then `probe`
    (an expression of the notebook's variables, printed as JSON); returns the probe's value."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    [index] = [i for i, cell in enumerate(notebook.cells)
               if "parameters" in cell.metadata.get("tags", [])]
    notebook.cells[index].source += "\n" + parameters
    notebook.cells.append(nbformat.v4.new_code_cell(
        f"import json as _json\nprint('PROBE' + _json.dumps({probe}))"))
    # The kernel inherits this environment: one CPU device (as a CPU Colab runtime has, not the
    # suite's 8 simulated ones), and the suite's compilation cache.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # The lowest backend optimisation level compiles these small programs twice as fast.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Started in notebooks/, a notebook finds the repository above it (as when opened there).
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            for output in cell.outputs:
                assert output.output_type != "error", output
    text = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    return json.loads(text.split("PROBE", 1)[1])


def test_quickstart_trains_generates_and_decodes_speculatively(tmp_path, monkeypatch):
    result = run_notebook(
        "quickstart.ipynb",
        f"STEPS = 24\nTOKENIZER_BYTES = 200_000\nNEW_TOKENS = 8\nOVERRIDES = {SMALL_MODEL!r}\n"
        f"WORKDIR = {str(tmp_path / 'run')!r}",
        "{'first': float(first), 'last': float(last), 'text': text, 'prompt': prompt, "
        "'same': bool(np.array_equal(spec_tokens, greedy)), 'acceptance': acceptance, "
        "'eval': [result.first_eval_loss, result.eval_loss]}", monkeypatch)
    assert result["last"] < result["first"] - 0.5  # the loss falls
    assert result["eval"][1] < result["eval"][0]
    assert result["text"].startswith(result["prompt"]) and len(result["text"]) > len(result["prompt"])
    assert result["same"] and result["acceptance"] >= 1.0


def test_hf_interop_matches_transformers(tmp_path, monkeypatch):
    result = run_notebook(
        "hf_interop.ipynb", f"NEW_TOKENS = 8\nWORKDIR = {str(tmp_path)!r}",
        "{'logits': logits_diff, 'greedy': greedy_equal, 'round_trip': round_trip_diff}", monkeypatch)
    assert result["logits"] < 1e-4 and result["greedy"] and result["round_trip"] < 1e-4


def test_ablations_notebook_tabulates_its_points(tmp_path, monkeypatch):
    result = run_notebook(
        "ablations.ipynb",
        f"POINTS = ['all_global']\nOVERRIDES = {SMALL_RUN!r}\n"
        f"WORKDIR = {str(tmp_path)!r}",
        "[[r.name, r.steps, r.eval_loss] for r in rows]", monkeypatch)
    assert [row[:2] for row in result] == [["all_global", 3]]
    assert all(0 < row[2] < 20 for row in result)
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_post_training_notebook_runs_sft_and_mopd(tmp_path, monkeypatch):
    result = run_notebook(
        "post_training.ipynb",
        f"STUDENT_STEPS = 3\nTEACHER_STEPS = 3\nMOPD_STEPS = 2\nEVAL_PROMPTS = 4\nEXAMPLES = 200\n"
        f"OVERRIDES = {POST_TRAINING_MODEL!r}\nWORKDIR = {str(tmp_path)!r}", "scores", monkeypatch)
    assert list(result) == ["student", "teacher (sort)", "after MOPD"]
    assert all(0.0 <= acc <= 1.0 for scores in result.values() for acc in scores.values())
    records = [json.loads(line) for line in (tmp_path / "mopd/metrics.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records if "reverse_kl" in r][-1] == 2
