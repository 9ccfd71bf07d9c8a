"""No import cycles, and imports at the top of modules: each module imported alone, and the
import graph read from the source (`import_graph.py`).

Imports inside functions hide cycles (and slow the first call); the only ones allowed are of
optional extras, listed in `PERMITTED_INNER_IMPORTS`, each with a comment that says why.
"""

import json
import pathlib
import re
import subprocess
import sys

from import_graph import ImportGraph

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKER = pathlib.Path(__file__).with_name("import_each_module.py")
PACKAGES = ("mimo_jax", "launch")
LINTED = ("mimo_jax", "launch", "benchmarks")

# (file, imported module): imports that stay inside a function, and why.
PERMITTED_INNER_IMPORTS = {
    ("mimo_jax/data/seqio_adapter.py", "seqio"): "the seqio extra, which brings TensorFlow",
    ("launch/launcher.py", "xmanager"): "the xm extra, needed only to launch through Docker",
}
_INNER_PRAGMA = re.compile(r"#\s*pylint:\s*disable=[\w,-]*\b(import-outside-toplevel|C0415)\b")
_IMPORTED = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))")


def _check_alone(root: pathlib.Path, *packages: str) -> dict:
    result = subprocess.run([sys.executable, str(CHECKER), str(root), *packages],
                            capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_module_imports_alone():
    result = _check_alone(REPO, *PACKAGES)
    expected = sum(1 for package in PACKAGES for _ in (REPO / package).rglob("*.py"))
    assert len(result["checked"]) == expected
    assert {"mimo_jax", "mimo_jax.cli.generate", "mimo_jax.train.trainer",
            "launch.jobs"} <= set(result["checked"])
    assert result["failed"] == {}


def test_a_cycle_fails_when_imported_from_either_end(tmp_path):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text("from cyclic.second import SECOND\nFIRST = 1\n")
    (package / "second.py").write_text("from cyclic.first import FIRST\nSECOND = 2\n")
    (package / "leaf.py").write_text("LEAF = 3\n")
    result = _check_alone(tmp_path, "cyclic")
    assert sorted(result["checked"]) == ["cyclic", "cyclic.first", "cyclic.leaf", "cyclic.second"]
    assert sorted(result["failed"]) == ["cyclic.first", "cyclic.second"]
    assert "partially initialized module" in result["failed"]["cyclic.first"]


def test_import_graph_has_no_cycle_and_no_inner_import():
    graph = ImportGraph.read(REPO, list(LINTED))
    assert graph.cycles() == []
    assert sorted(graph.inner_imports) == sorted(PERMITTED_INNER_IMPORTS)
    assert {"mimo_jax.train.loop", "mimo_jax.train.mopd_step"} <= graph.edges[
        "mimo_jax.train.mopd_trainer"]


def test_import_graph_finds_cycles_and_inner_imports(tmp_path):
    """A cycle through a relative import and a `from package import module`, one through
    `import a.b`, a TYPE_CHECKING-only import (no edge) and an import inside a function."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg import leaf\n",
        "first.py": "from .second import SECOND\nFIRST = 1\n",
        "second.py": "from pkg import first\nSECOND = 2\n",
        "leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    import pkg.first\n\ndef late():\n    import json\n",
        "sub/__init__.py": "",
        "sub/a.py": "import pkg.sub.b\n",
        "sub/b.py": "from pkg.sub import a\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = ImportGraph.read(tmp_path, ["pkg"])
    assert graph.cycles() == [["pkg.first", "pkg.second"], ["pkg.sub.a", "pkg.sub.b"]]
    assert graph.edges["pkg"] == {"pkg.leaf"} and graph.edges["pkg.leaf"] == set()
    assert graph.inner_imports == [("pkg/leaf.py", "json")]


def _inner_imports() -> dict[tuple[str, str], str]:
    """(file, imported module) -> the reason comment, for every import pylint is told to allow
    inside a function. The reason is the comment on the line above the import."""
    found = {}
    for package in LINTED:
        for path in sorted((REPO / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines):
                if not _INNER_PRAGMA.search(line):
                    continue
                imported = _IMPORTED.match(line)
                module = (imported.group(1) or imported.group(2)) if imported else line.strip()
                above = lines[number - 1].strip() if number else ""
                reason = above[1:].strip() if above.startswith("#") else ""
                found[(str(path.relative_to(REPO)), module)] = reason
    return found


def test_inner_imports_are_only_the_permitted_extras_and_say_why():
    found = _inner_imports()
    unexpected = sorted(set(found) - set(PERMITTED_INNER_IMPORTS))
    assert unexpected == [], f"imports inside functions that are not optional extras: {unexpected}"
    assert sorted(found) == sorted(PERMITTED_INNER_IMPORTS)
    for where, reason in found.items():
        assert len(reason.split()) >= 4, f"{where}: say why on the line above the import"
