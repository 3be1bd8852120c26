"""The package's layers: imports point one way, only the run layer writes files.

Layers, bottom to top: the core (models, guides, flows, losses, importance sampling, capture,
data, mixtures, networks, configuration), ``plots`` (figures, no files), ``runs`` (the only
layer on disk) and ``cli`` (parsing and dispatch). See docs/ARCHITECTURE.md.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ppl_vae"
MODULES = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted(PACKAGE.rglob("*.py"))
}
TOP = {"ppl_vae", "ppl_vae.__main__", "ppl_vae.cli"}  # the entry points
RUNS = {m for m in MODULES if m == "ppl_vae.runs" or m.startswith("ppl_vae.runs.")}
CORE = set(MODULES) - TOP - RUNS - {"ppl_vae.plots"}
WRITES = ("torch.save", "savefig", "write_text", "write_bytes", "mkdir", "os.replace", "mkstemp")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported ppl_vae module, whether the import is inside a function) for one file."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppl_vae"):
            for alias in node.names:  # "from ppl_vae.x import y": y may be a module too
                full = f"{node.module}.{alias.name}"
                found.append((full if full in MODULES else node.module, id(node) in local))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ppl_vae"):
                    found.append((alias.name, id(node) in local))
    return found


GRAPH = {m: {i for i, _ in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_the_package_has_no_import_cycle():
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(m) :] + [m])}")
        if m in done:
            return
        path.append(m)
        for n in GRAPH[m]:
            if not (m in ("ppl_vae",) or n == "ppl_vae"):  # the package __init__ re-exports
                visit(n)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_modules_import_neither_the_run_layer_nor_the_cli_nor_plots(module):
    above = {m for m in GRAPH[module] if m in RUNS or m in TOP or m == "ppl_vae.plots"}
    assert not above, f"{module} imports {sorted(above)}"


def test_plots_import_no_layer_above_them():
    assert not {m for m in GRAPH["ppl_vae.plots"] if m in RUNS or m in TOP}


# The one exception: the console script's entry imports the CLI (torch, Pyro: a second or more)
# only once it handles Ctrl-C and SIGTERM, so that a signal while they load is one line.
ENTRY_IMPORT = ("ppl_vae.__main__", "ppl_vae.cli")


def test_no_function_local_import_of_the_package():
    """A function-local import must not hide a cycle (optional packages such as zuko are fine)."""
    hidden = [(m, i) for m, p in MODULES.items() for i, local in imports(p) if local]
    assert hidden == [ENTRY_IMPORT], hidden


# The one exception: SharedSum (ppl_vae.distributed) makes its file in /dev/shm with os.open
# (O_EXCL) and unlinks it as soon as every rank has mapped it: a channel between the processes
# of one run, never a file a user sees.
SHARED_MEMORY_FILE = ("ppl_vae.distributed", "os.open(")


@pytest.mark.parametrize("module", sorted(CORE | {"ppl_vae.plots", "ppl_vae.cli"}))
def test_only_the_run_layer_writes_files(module):
    text = MODULES[module].read_text()
    if module == SHARED_MEMORY_FILE[0]:
        assert text.count(SHARED_MEMORY_FILE[1]) == 1, module
        text = text.replace(SHARED_MEMORY_FILE[1], "")
    assert not [w for w in WRITES if w in text], module
    assert "open(" not in text.replace("fdopen(", ""), module


def test_the_cli_holds_parsing_and_dispatch_only():
    tree = ast.parse(MODULES["ppl_vae.cli"].read_text())
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes == ["_Parser"]  # the one-line-error argparse parser
    assert "torch" not in {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
