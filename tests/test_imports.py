"""The import direction of docs/DESIGN.md §2.2, and the reading budgets of the two training scripts.

    scripts (train_*.py, scripts/)  ->  library (nanopairwise/)  ->  ops.py  ->  kernels/  ->  references (losses.py)

A module imports only modules of its own layer or of a lower one; no module imports a training
script (what train_rm.py, train_ppo.py and the scripts share lives in the library, and the
pipeline runs the trainers as programs), except scripts/bench_ppo_step.py, which reads
train_ppo.py's flags to time its step; the library reaches kernels/ (and the PyTorch
implementations of an op beside them: nanopairwise/logprob_chunked.py) only through ops.py; and
within nanopairwise/ the module graph has no cycle. Every import counts, a lazy one inside a function
too: the files are parsed (ast), nothing is imported.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("references", "kernels", "ops", "library", "scripts")   # lowest first
OP_IMPLEMENTATIONS = ("nanopairwise.logprob_chunked",)   # PyTorch implementations of an op: kernels' layer
TRAINING_SCRIPTS = ("train_rm", "train_ppo")
ALLOWED_SCRIPT_IMPORTS = {("scripts.bench_ppo_step", "train_ppo")}  # the benchmark reads train_ppo's flags
FUNCTION_LINES = 60                                                   # the longest function of a training script
FILE_LINES = {"train_ppo.py": 450, "train_rm.py": 350}


def project_modules() -> dict:
    """{module name: file path} of every project module outside tests/."""
    found = {name: os.path.join(ROOT, f"{name}.py") for name in ("train_rm", "train_ppo")}
    for package in ("nanopairwise", "kernels", "scripts"):
        for file in sorted(os.listdir(os.path.join(ROOT, package))):
            if file.endswith(".py"):
                stem = file[:-3]
                found[package if stem == "__init__" else f"{package}.{stem}"] = os.path.join(ROOT, package, file)
    return found


def layer(module: str) -> str:
    if module == "nanopairwise.losses":
        return "references"
    if module == "nanopairwise.ops":
        return "ops"
    if module.split(".")[0] in ("kernels",) or module in OP_IMPLEMENTATIONS:
        return "kernels"
    if module.split(".")[0] == "nanopairwise":
        return "library"
    return "scripts"


def imports_of(path: str, modules: dict) -> set:
    """The project modules `path` imports anywhere in the file (module level or inside a function).
    A bare name that is a sibling in scripts/ (scripts/ is on sys.path of its scripts) counts."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = submodules or [node.module]          # `from nanopairwise import data`: data, not the package
        else:
            continue
        for name in names:
            for candidate in (name, f"scripts.{name}"):
                if candidate in modules:
                    out.add(candidate)
    return out


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {m: imports_of(path, modules) - {m} for m, path in modules.items()}


def test_imports_run_one_way(graph):
    bad = []
    for module, targets in graph.items():
        for target in sorted(targets):
            here, there = LAYERS.index(layer(module)), LAYERS.index(layer(target))
            if there > here or (target in TRAINING_SCRIPTS and (module, target) not in ALLOWED_SCRIPT_IMPORTS):
                bad.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
            elif layer(module) == "library" and layer(target) == "kernels":
                bad.append(f"{module} imports {target}: the library reaches kernels/ only through ops.py")
    assert not bad, "imports against docs/DESIGN.md §2.2:\n" + "\n".join(bad)


def test_no_import_cycle_in_the_library(graph):
    library = {m: {t for t in ts if layer(t) == "library"} for m, ts in graph.items() if layer(m) == "library"}
    cycles = []

    def visit(module, path):
        for target in sorted(library[module]):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done = set()
    for module in sorted(library):
        if module not in done:
            visit(module, [module])
    assert not cycles, "import cycles in nanopairwise/:\n" + "\n".join(sorted(set(cycles)))


@pytest.mark.parametrize("script", sorted(FILE_LINES))
def test_training_scripts_read_in_short_functions(script):
    """Each function of a training script fits a screen, and the file its reading budget."""
    source = open(os.path.join(ROOT, script), encoding="utf-8").read()
    assert len(source.splitlines()) <= FILE_LINES[script]
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(ast.parse(source))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    long = {name: n for name, n in lengths.items() if n > FUNCTION_LINES}
    assert not long, f"{script}: functions over {FUNCTION_LINES} lines: {long}"
