"""Imports every module of some packages, each alone in a fresh copy of this interpreter.

    python tests/import_each_module.py ROOT PACKAGE [PACKAGE ...]

An import cycle breaks only when the import starts at a particular module of the cycle, so each
module must be the first of its package to be imported. One `python -c "import M"` per module
would spend most of its time importing JAX again and again; instead this process imports the
third-party libraries once (they cannot take part in a cycle of ours) and forks one child per
module, which starts with none of ROOT's packages imported. Prints a JSON object
{"checked": [module, ...], "failed": {module: "the error"}}.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys
import traceback

# Imported once here so that each child only imports our own code.
THIRD_PARTY = ("jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "grain", "numpy",
               "ml_collections", "absl.app", "absl.flags", "chex", "tokenizers", "safetensors",
               "tensorboardX", "tqdm", "matplotlib.figure",
               "array_record.python.array_record_module")


def module_names(root: pathlib.Path, package: str) -> list[str]:
    """Every module of `package` (a folder under `root`), packages included, from the files."""
    names = []
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def start_import(name: str) -> tuple[int, int]:
    """Forks a child that imports `name` and exits 0, or writes the error's last line to a pipe
    and exits 1. Returns (child pid, the pipe's read end)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        status = 0
        try:
            importlib.import_module(name)
        except BaseException:  # pylint: disable=broad-exception-caught  # reported, not handled
            os.write(write_end, traceback.format_exc().strip().splitlines()[-1].encode())
            status = 1
        os.close(write_end)
        os._exit(status)  # skips the atexit handlers the parent's libraries registered
    os.close(write_end)
    return pid, read_end


def import_each(names: list[str], jobs: int) -> dict[str, str]:
    """Imports each module alone, `jobs` children at a time; {module: error} of the failures."""
    running: dict[int, tuple[str, int]] = {}
    failed = {}

    def collect_one() -> None:
        pid, status = os.wait()
        name, read_end = running.pop(pid)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode()
        if status != 0:
            failed[name] = message or f"exit status {status}"

    for name in names:
        while len(running) >= jobs:
            collect_one()
        pid, read_end = start_import(name)
        running[pid] = (name, read_end)
    while running:
        collect_one()
    return failed


def main(argv: list[str]) -> None:
    root = pathlib.Path(argv[1]).resolve()
    packages = argv[2:]
    sys.path.insert(0, str(root))
    for name in THIRD_PARTY:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # only slower: the children import it themselves
    ours = [m for m in sys.modules if m.split(".")[0] in packages]
    if ours:
        raise SystemExit(f"a third-party import pulled in our modules {ours}: nothing is alone")
    names = [name for package in packages for name in module_names(root, package)]
    failed = import_each(names, jobs=min(4, os.cpu_count() or 1))
    print(json.dumps({"checked": names, "failed": failed}))


if __name__ == "__main__":
    main(sys.argv)
