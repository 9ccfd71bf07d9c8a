"""Test setup: CPU only, 8 simulated devices, float32 matmuls at full precision, a persistent
compilation cache, absl flags marked parsed."""

import os
import pathlib
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in xla_flags:
    os.environ["XLA_FLAGS"] = (xla_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the environment set-up above)

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same programs (each trainer run builds its own jitted functions, and
# both xdist workers build the shared fixtures): one on-disk cache serves them all. A compiled
# program is the same binary whether it came from the cache or not.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "MIMO_JAX_TEST_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "mimo_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

import pytest  # noqa: E402
from absl import flags  # noqa: E402

import micro_runs  # noqa: E402
import model_configs  # noqa: E402
from mimo_jax.config import ModelConfig, replace_model  # noqa: E402


def small_model_config(**overrides) -> ModelConfig:
    """`model_configs.SMALL` (configs/tiny.py shrunk: 4 layers, window 9, float32, 8 experts top-2,
    vocab 512). Keyword overrides replace ModelConfig fields."""
    config = model_configs.tiny_model(model_configs.SMALL)
    return replace_model(config, **overrides) if overrides else config


@pytest.fixture(scope="session", autouse=True)
def _parsed_flags():
    """Grain's worker processes read absl flags, which must be parsed (absl apps do this)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@pytest.fixture(name="small_config", scope="session")
def fixture_small_config():
    """The factory `small_model_config` as a fixture."""
    return small_model_config


@pytest.fixture(scope="session", name="corpus_dir")
def fixture_corpus_dir(tmp_path_factory) -> pathlib.Path:
    """`micro_runs.make_corpus`: a small text corpus and its tokenizer, made once."""
    return micro_runs.make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session", name="micro")
def fixture_micro():
    """The micro-run helpers (`micro_runs`), for test modules."""
    return micro_runs
