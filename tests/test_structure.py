"""The package's shape: no import cycle (function-level imports included), no module importing another's
private names, the core (layers + surgery + merge) short enough to read in one sitting, and every module
importable on its own in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "lorakit"
MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported lorakit module, the names taken from it) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").startswith("lorakit"):
                target = node.module
            else:
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, []) for s in subs] + [(target, [n for n in names if f"{target}.{n}" not in MODULES])]
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("lorakit")]
    return [(t, n) for t, n in out if t in MODULES and t != name]


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_no_import_cycles():
    edges = {name: {t for t, _ in deps if t != "lorakit"} for name, deps in GRAPH.items() if name != "lorakit"}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " → ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_no_private_names_imported_across_modules():
    private = [f"{name} takes {n} from {target}" for name, deps in GRAPH.items() for target, names in deps
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private


def test_quant_is_a_leaf_and_the_fast_paths_import_nothing_of_the_core():
    for leaf in ("lorakit.quant", "lorakit.fused", "lorakit.atomic"):
        assert GRAPH[leaf] == [], (leaf, GRAPH[leaf])
    for fast in ("lorakit.mixed", "lorakit.dora"):  # they build on each other and on quant, never on the core
        assert {t for t, _ in GRAPH[fast]} <= {"lorakit", "lorakit.fused", "lorakit.dora", "lorakit.quant"}, fast


def test_the_core_reads_in_one_sitting():
    lines = sum(len(MODULES[m].read_text().splitlines()) for m in ("lorakit.layers", "lorakit.inject", "lorakit.merge"))
    assert lines <= 675, lines


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = [n for n in MODULES if not n.endswith("__main__")]
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n"
            "    for m in [k for k in sys.modules if k == 'lorakit' or k.startswith('lorakit.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n")
    for order in (names, names[::-1]):
        result = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
