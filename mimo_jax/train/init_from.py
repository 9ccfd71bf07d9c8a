"""Starting a run from trained parameters (`config.init_from`): post-training, and the next
pretraining stage.

    source = init_from.locate("runs/pretrain", run_model_config)    # what is there, nothing read
    init_from.check_architecture(source, run_model_config)           # CheckpointError on mismatch
    init_from.check_tokenizer(source, run_tokenizer)                 # CheckpointError on mismatch
    params = init_from.load_params(source, run_model_config, shardings=param_shardings)
    opt_state = init_from.load_optimizer_state(source, abstract_opt_state)  # optional

`init_from` names one of:
  a params export    a directory with `model_config.json` and `params/` (`checkpoint.export_params`)
  a training workdir its newest checkpoint's parameters (from `checkpoints/`), else its `export/`
  a Hugging Face dir `config.json` and `*.safetensors` (`mimo_jax.convert.hf`)

This is not resuming: only the parameters (router biases included) are read; the step, the RNG
and the data position of the new run start fresh, and so does the optimizer unless the run sets
`init_from_optimizer` (a pretraining stage continuing the previous one's AdamW moments and their
bias-correction count, read from a training checkpoint: an export or a Hugging Face directory
holds none). The saved model's
architecture must be the run's (`config.architecture`, compared field by field), except:
  - `init_std`, which only shapes a fresh initialisation;
  - a Hugging Face directory's `scan_layers` and `param_dtype`, which that format does not fix
    (the parameters are read in the run's layout and cast to its dtype);
  - with `copy_mtp_head`, a saved model with fewer MTP heads than the run: the saved heads are
    kept and each extra head starts as a copy of head 0 (post-training copies the one
    pretrained head into 3, which then train jointly);
  - with `stage=True` (a pretraining stage starting from the previous one), the fields a stage
    may change, `STAGE_FIELDS` (RoPE theta and window of either attention kind); the run lists
    the ones that changed (`stage_changes`).
Runtime fields (compute dtype, kernels, dispatch) are the run's. The run's tokenizer must be the
one saved beside the parameters, when both exist.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from mimo_jax.config import RUNTIME_KEYS, ModelConfig, architecture, model_config_from_dict
from mimo_jax.config_reader import ConfigError, parse_value
from mimo_jax.convert import hf
from mimo_jax.convert.errors import CheckpointError as HfCheckpointError
from mimo_jax.data.errors import DataError
from mimo_jax.data.tokenizer import TextTokenizer, load_tokenizer
from mimo_jax.model.transformer import MiMoV2Flash, init_params
from mimo_jax.train.checkpoint import CHECKPOINT_DIR, EXPORT_DIR, CheckpointError, mismatch

EXPORT, CHECKPOINT, HF = "export", "checkpoint", "hf"
TOKENIZER_FILE = "tokenizer.json"
MODEL_CONFIG_FILE = "model_config.json"
MTP_PREFIX = "mtp_"
INIT_FROM_KEY = "init_from"
OPTIMIZER_KEY = "init_from_optimizer"
# Architecture fields that loaded parameters make irrelevant.
_FRESH_INIT_ONLY = ("init_std",)
# Architecture fields a pretraining stage may change from the previous stage's (the 256k
# extension raises the global layers' RoPE theta 640k -> 5M; the weights are the same shapes).
STAGE_FIELDS = tuple(f"{kind}.{field}" for kind in ("full", "sliding")
                     for field in ("rope_theta", "sliding_window"))


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a run's first parameters come from, as found by `locate` (nothing loaded yet).

    path:           the export, checkpoint step or Hugging Face directory read.
    kind:           EXPORT, CHECKPOINT or HF.
    model_config:   the saved model's config (runtime fields: defaults).
    tokenizer_file: the tokenizer.json saved beside the parameters, if any.
    """

    path: pathlib.Path
    kind: str
    model_config: ModelConfig
    tokenizer_file: pathlib.Path | None

    def describe(self) -> str:
        """One line for logs: what is read, from where."""
        what = {EXPORT: "params export", CHECKPOINT: "the parameters of checkpoint",
                HF: "Hugging Face checkpoint"}[self.kind]
        return f"{what} {self.path}"


def _tokenizer_in(*directories: pathlib.Path) -> pathlib.Path | None:
    for directory in directories:
        if (directory / TOKENIZER_FILE).is_file():
            return directory / TOKENIZER_FILE
    return None


def _checkpoint_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
    """A manager over another run's checkpoints that never writes or deletes anything."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                 item_names=("state", "data", "meta"))


def _checkpoint_source(workdir: pathlib.Path) -> InitSource | None:
    """The newest checkpoint of a training workdir, or None when it has none."""
    directory = workdir / CHECKPOINT_DIR
    if not directory.is_dir():
        return None
    with _checkpoint_manager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            return None
        try:
            meta = manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore())).meta
        except Exception as err:  # orbax raises several types for unreadable directories
            raise CheckpointError(f"init_from checkpoint {directory / str(step)} cannot be read: "
                                  f"{type(err).__name__}: {err}") from err
    if "architecture" not in meta:
        raise CheckpointError(f"init_from checkpoint {directory / str(step)} does not say which "
                              "model it holds (no architecture in its meta)")
    return InitSource(directory / str(step), CHECKPOINT,
                      model_config_from_dict(meta["architecture"]), _tokenizer_in(workdir))


def _export_source(directory: pathlib.Path, workdir: pathlib.Path | None = None) -> InitSource:
    """An export's model config (its saved runtime dropped: the run's applies) and tokenizer;
    an export inside a workdir may have its tokenizer in the workdir."""
    path = directory / MODEL_CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"init_from file {path} cannot be read: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"init_from file {path} is not a JSON object")
    # Exports written before the runtime had a section of their own kept its keys flat.
    for key in ("runtime", *RUNTIME_KEYS):
        raw.pop(key, None)
    tokenizer = _tokenizer_in(directory, *([workdir] if workdir else []))
    return InitSource(directory, EXPORT, model_config_from_dict(raw), tokenizer)


def _is_hf(directory: pathlib.Path) -> bool:
    return (directory / hf.CONFIG_FILE).is_file() and any(directory.glob("*.safetensors"))


def locate(path: str | pathlib.Path, run_config: ModelConfig) -> InitSource:
    """What `init_from = path` names: an export, a workdir's newest checkpoint (else its
    export), or a Hugging Face directory (its config read in the run's `scan_layers` and
    `param_dtype`). Raises `CheckpointError` naming the path when it is missing or holds no
    parameters."""
    directory = pathlib.Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"init_from path {str(path)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"init_from path {str(path)!r} is a file, not a params export, "
                              "training workdir or Hugging Face directory")
    directory = directory.absolute()
    if (directory / MODEL_CONFIG_FILE).is_file():
        return _export_source(directory)
    found = _checkpoint_source(directory)
    if found is not None:
        return found
    if (directory / EXPORT_DIR / MODEL_CONFIG_FILE).is_file():
        return _export_source(directory / EXPORT_DIR, directory)
    if _is_hf(directory):
        try:
            config = hf.read_config(str(directory), scan_layers=run_config.scan_layers,
                                    param_dtype=run_config.param_dtype)
        except HfCheckpointError as err:
            raise CheckpointError(f"init_from {directory}: {err}") from err
        return InitSource(directory, HF, config, _tokenizer_in(directory))
    raise CheckpointError(
        f"init_from path {str(path)!r} holds no parameters: it is not a params export "
        f"({MODEL_CONFIG_FILE}), a training workdir ({CHECKPOINT_DIR}/ or {EXPORT_DIR}/) or a "
        f"Hugging Face directory ({hf.CONFIG_FILE} and *.safetensors)")


def _copies_heads(saved: ModelConfig, run: ModelConfig, copy_mtp_head: bool) -> bool:
    return copy_mtp_head and 0 < saved.num_mtp_heads < run.num_mtp_heads


def _drop_stage_fields(tree: dict) -> None:
    for name in STAGE_FIELDS:
        kind, field = name.split(".")
        del tree[kind][field]


def stage_changes(source: InitSource, run_config: ModelConfig) -> list[str]:
    """'model.FIELD: checkpoint=A run=B' for each of `STAGE_FIELDS` the run changes."""
    saved, run = architecture(source.model_config), architecture(run_config)
    return [d for d in mismatch(saved, run, "model")
            if d.split(":")[0].removeprefix("model.") in STAGE_FIELDS]


def check_architecture(source: InitSource, run_config: ModelConfig, *,
                       copy_mtp_head: bool = False, copy_option: str = "",
                       stage: bool = False) -> None:
    """Raises `CheckpointError` listing every architecture field in which the saved model
    differs from the run's (see the module docstring for what may differ).

    copy_option: the config key that turns `copy_mtp_head` on, named in the message when the
    MTP head count is what differs. stage: `STAGE_FIELDS` may differ.
    """
    saved, run = architecture(source.model_config), architecture(run_config)
    ignored = _FRESH_INIT_ONLY
    if _copies_heads(source.model_config, run_config, copy_mtp_head):
        ignored += ("num_mtp_heads",)
    for key in ignored:
        del saved[key], run[key]
    if stage:
        _drop_stage_fields(saved)
        _drop_stage_fields(run)
    heads = (source.model_config.num_mtp_heads, run_config.num_mtp_heads)
    diff = mismatch(saved, run, "model")
    if not diff:
        return
    hint = " (runtime fields may differ; set the others to the saved model's)"
    if copy_option and [d.split(":")[0] for d in diff] == ["model.num_mtp_heads"] and (
            0 < heads[0] < heads[1]):
        hint = (f" ({copy_option}=True starts MTP heads {heads[0]}..{heads[1] - 1} as copies of "
                "head 0)")
    raise CheckpointError(f"init_from {source.path} holds a different model architecture: "
                          + "; ".join(diff[:6]) + ("; ..." if len(diff) > 6 else "") + hint)


def check_tokenizer(source: InitSource, tokenizer: TextTokenizer | None) -> None:
    """Raises `CheckpointError` naming both when the run's tokenizer is not the one saved beside
    the parameters (nothing to compare when either is missing)."""
    if tokenizer is None or source.tokenizer_file is None:
        return
    try:
        saved = load_tokenizer(source.tokenizer_file)
    except DataError as err:
        raise CheckpointError(f"init_from {source.path}: {err}") from err
    if saved.fingerprint() != tokenizer.fingerprint():
        raise CheckpointError(
            f"the run's tokenizer {tokenizer.source!r} is not the tokenizer "
            f"{str(source.tokenizer_file)!r} saved with init_from {source.path} (their ids "
            "differ; leave data.tokenizer empty to use the saved one)")


def _saved_tree(tree: Any, num_mtp_heads: int) -> Any:
    """A run-shaped params tree without the MTP heads past the saved model's count."""
    return {key: value for key, value in tree.items()
            if not (key.startswith(MTP_PREFIX) and int(key[len(MTP_PREFIX):]) >= num_mtp_heads)}


def copy_mtp_heads(params: dict, num_mtp_heads: int) -> dict:
    """`params` with MTP heads up to `num_mtp_heads`, each missing one a copy of `mtp_0`
    (fresh arrays, so that no buffer appears twice in a train state)."""
    out = dict(params)
    for k in range(num_mtp_heads):
        if f"{MTP_PREFIX}{k}" not in out:
            out[f"{MTP_PREFIX}{k}"] = jax.tree.map(lambda x: x.copy(), params[f"{MTP_PREFIX}0"])
    return out


def _restore_state_part(source: InitSource, part: str, abstract: Any) -> Any:
    """One field of the train state saved in checkpoint `source` ("params", "opt_state"), laid
    out as `abstract`; the rest of the state is not read."""
    item = {part: abstract}
    with _checkpoint_manager(source.path.parent) as manager:
        restored = manager.restore(int(source.path.name), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True)))
    return restored.state[part]


def _restore_params(source: InitSource, abstract: Any) -> Any:
    """The parameters of an export or checkpoint, laid out as `abstract` (with shardings)."""
    try:
        if source.kind == EXPORT:
            with ocp.StandardCheckpointer() as checkpointer:
                return checkpointer.restore(source.path / "params", abstract)
        return _restore_state_part(source, "params", abstract)
    except Exception as err:  # orbax raises several types for damaged checkpoints
        raise CheckpointError(f"init_from {source.describe()} cannot be restored: "
                              f"{type(err).__name__}: {err}") from err


def load_params(source: InitSource, run_config: ModelConfig, *, shardings: Any = None,
                copy_mtp_head: bool = False, stage: bool = False) -> dict:
    """The saved parameters in the run's layout, each placed with its sharding in `shardings`
    (a run-shaped tree; None: the default device), with extra MTP heads copied from head 0
    when `copy_mtp_head` allows it. Checks the architecture first (`stage`: as a pretraining
    stage, which may change `STAGE_FIELDS`)."""
    check_architecture(source, run_config, copy_mtp_head=copy_mtp_head, stage=stage)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, jax.eval_shape(
            lambda: init_params(MiMoV2Flash(run_config), jax.random.key(0))))
    saved_heads = source.model_config.num_mtp_heads
    saved_shardings = _saved_tree(shardings, saved_heads)
    if source.kind == HF:
        try:
            _, params = hf.load(str(source.path), shardings=saved_shardings,
                                scan_layers=run_config.scan_layers,
                                param_dtype=run_config.param_dtype)
        except HfCheckpointError as err:
            raise CheckpointError(f"init_from {source.path}: {err}") from err
    else:
        saved_config = dataclasses.replace(source.model_config, runtime=run_config.runtime)
        shapes = jax.eval_shape(lambda: init_params(MiMoV2Flash(saved_config),
                                                    jax.random.key(0)))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                shapes, saved_shardings)
        params = _restore_params(source, abstract)
    if _copies_heads(source.model_config, run_config, copy_mtp_head):
        params = copy_mtp_heads(params, run_config.num_mtp_heads)
    return params


def check_optimizer_source(source: InitSource) -> None:
    """Raises `CheckpointError` unless `source` holds an optimizer state (a training checkpoint)."""
    if source.kind != CHECKPOINT:
        raise CheckpointError(
            f"{OPTIMIZER_KEY}=True reads the optimizer state of a training checkpoint, but "
            f"init_from names a {source.describe()}, which holds parameters only (point "
            f"init_from at the previous run's workdir, or set {OPTIMIZER_KEY}=False)")


def load_optimizer_state(source: InitSource, abstract: Any) -> Any:
    """The optimizer state saved in `source`'s checkpoint, laid out as `abstract` (the run's
    optax state as ShapeDtypeStructs with shardings). The run's optimizer must be built like the
    saved one (same transformations; the parameters' shapes are checked by `check_architecture`
    first); a different layout raises `CheckpointError`."""
    check_optimizer_source(source)
    try:
        return _restore_state_part(source, "opt_state", abstract)
    except Exception as err:  # orbax raises several types for damaged or other layouts
        raise CheckpointError(f"{OPTIMIZER_KEY}: the optimizer state of {source.describe()} "
                              f"cannot be restored into this run's optimizer: "
                              f"{type(err).__name__}: {err}") from err


def carries_optimizer(config: Any) -> bool:
    """The run config's top-level `init_from_optimizer` (missing: False)."""
    value = config.get(OPTIMIZER_KEY) if hasattr(config, "get") else None
    return False if value is None else parse_value(bool, value, OPTIMIZER_KEY)


def refuse_optimizer_carry(config: Any, trainer: str) -> None:
    """Raises `ConfigError` when the run config asks a trainer that always starts its optimizer
    fresh (post-training) to carry init_from's optimizer state."""
    if carries_optimizer(config):
        raise ConfigError(f"config key '{OPTIMIZER_KEY}' is True, but {trainer} starts its "
                          "optimizer fresh from init_from's parameters (set it to False)")


def init_from_path(config: Any) -> str:
    """The run config's top-level `init_from` ("" or missing: a fresh initialisation)."""
    value = config.get(INIT_FROM_KEY) if hasattr(config, "get") else None
    return "" if value is None else parse_value(str, value, INIT_FROM_KEY).strip()
