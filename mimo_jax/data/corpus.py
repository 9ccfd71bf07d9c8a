"""The embedded default corpus: the Python standard library's own source files.

Every Python installation carries it, so the default run trains on real text with no download.
Files are listed in sorted order of their path relative to the library root and split into
train / eval by a hash of that relative path, so the split is the same on every machine and does
not change when a file is added elsewhere in the tree.
"""

from __future__ import annotations

import functools
import pathlib
import sysconfig
import zlib

from mimo_jax.data.errors import DataError

# Third-party packages live under the library root but are not part of the standard library.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_SPLITS = ("train", "eval")


def stdlib_root() -> pathlib.Path:
    """The directory of the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=4)
def _all_files(root: str) -> tuple[str, ...]:
    base = pathlib.Path(root)
    found = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if _EXCLUDED_DIRS.isdisjoint(rel.parts) and path.is_file():
            found.append(rel.as_posix())
    return tuple(sorted(found))


def is_eval_file(relative_path: str, eval_percent: float) -> bool:
    """Whether a file belongs to the held-out split: crc32(path) mod 10,000 < 100 * percent."""
    return zlib.crc32(relative_path.encode("utf-8")) % 10_000 < round(eval_percent * 100)


def stdlib_files(split: str, eval_percent: float, root: pathlib.Path | None = None
                 ) -> list[pathlib.Path]:
    """Sorted .py files of one split ("train" or "eval") of the standard-library corpus."""
    if split not in _SPLITS:
        raise ValueError(f"split {split!r} is not one of {_SPLITS}")
    base = root or stdlib_root()
    if not base.is_dir():
        raise DataError(f"standard library directory {str(base)!r} does not exist")
    rels = [r for r in _all_files(str(base)) if is_eval_file(r, eval_percent) == (split == "eval")]
    if not rels:
        raise DataError(f"no .py files for split {split!r} under {str(base)!r} "
                        f"(eval_percent={eval_percent})")
    return [base / r for r in rels]
