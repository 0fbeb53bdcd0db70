"""The package's shape: layers by folder, imports only downward, no import cycle.

Every `opsdlab` import in `src/` (module level or deferred inside a function: a deferred import hides
a cycle but keeps it) must point to the same layer or a lower one, and the module graph must have no
cycle. The layer of a module is the first folder under `opsdlab/` (or the module's own name at the
top), ranked by `LAYERS`.

The config layer is pure data: loading, checking and showing a config, and the command line's
answer to a bad value, import none of torch, transformers, TRL or vLLM (checked in a fresh interpreter).
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module may import its own layer and any layer before it.
LAYERS = ("config", "tasks", "loss", "modeling", "evaluation", "stages", "run", "report", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every opsdlab module `path` imports, resolved to the module (not the names taken from it)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "opsdlab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "opsdlab":
                continue
            # `from opsdlab.x import y` may import the submodule opsdlab.x.y
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if module_path(sub) else target)
    return {module for module in found if module != name}


def module_path(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def layer_of(module: str) -> int:
    """The rank of a module's layer: its first folder under opsdlab, or its own name at the top."""
    parts = module.split(".")
    if len(parts) == 1:  # the package itself (its version) is below every layer
        return -1
    return LAYERS.index(parts[1])


def graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) for path in sorted((SRC / "opsdlab").rglob("*.py"))}


def cycle_in(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_is_in_a_layer():
    unplaced = [module for module in graph() if module.split(".")[1:2] and module.split(".")[1] not in LAYERS]
    assert not unplaced, f"modules outside the layers {LAYERS}: {unplaced}"


def test_imports_point_only_downward():
    upward = sorted(f"{module} -> {target}" for module, targets in graph().items() for target in targets
                    if layer_of(target) > layer_of(module))
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    assert cycle_in(graph()) is None, f"import cycle: {' -> '.join(cycle_in(graph()))}"


def test_the_cycle_finder_finds_a_cycle_and_an_upward_import_is_seen():
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None
    assert layer_of("opsdlab.run.pipeline") > layer_of("opsdlab.stages.checks")


HEAVY = ("torch", "transformers", "trl", "vllm")


def run_fresh(code: str, cwd: Path) -> tuple[str, list[str]]:
    """Run `code` in a fresh interpreter on this checkout's sources; its last printed line, and which
    of the `HEAVY` packages it imported."""
    script = (f"{code}\nimport json, sys\n"
              f"print(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}} & {set(HEAVY)!r})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    *out, heavy = result.stdout.splitlines()
    return (out[-1] if out else ""), json.loads(heavy)


def test_loading_checking_and_showing_a_config_import_no_training_stack(tmp_path):
    code = """
from opsdlab.config import ConfigError, describe_config, format_keys, load_config
try:
    load_config("tiny", ["opsd.max_steps=abc"])
except ConfigError as error:
    print(error)
assert len(format_keys(describe_config(load_config("qwen3-1.7b")))) > 100
"""
    said, heavy = run_fresh(code, tmp_path)
    assert said == "opsd.max_steps: expected an integer, got 'abc' (str)"
    assert heavy == []


@pytest.mark.parametrize("argv, exit_code", [
    (["pipeline", "--config", "tiny", "opsd.max_steps=abc"], 2),
    (["demo", "opsd.learning_rate=-1"], 2),
    (["config", "show", "qwen3-1.7b"], 0),
    (["--help"], 0),
    (["sft", "--model", "tiny", "--out", "out", "--set", "learning_rate=abc"], 2),
    (["eval", "--model", "tiny", "--data", "synthetic", "--out", "a_file/out"], 2),
])
def test_the_command_line_answers_a_bad_value_help_and_config_show_without_the_training_stack(tmp_path, argv,
                                                                                              exit_code):
    (tmp_path / "a_file").write_text("")  # an --out below a file cannot be written
    code = f"""
import contextlib, io
from opsdlab.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        code = main({argv!r})
    except SystemExit as stop:
        code = stop.code
print(code)
"""
    said, heavy = run_fresh(code, tmp_path)
    assert said == str(exit_code)
    assert heavy == []
