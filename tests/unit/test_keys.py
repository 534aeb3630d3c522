"""One key, one source: the README's key tables are the schemas', every key is documented where it is
declared and says whether it changes the math; and the code keeps the shape it promises (docstrings,
short functions, no import circles, a config module that imports no implementation)."""

from __future__ import annotations

import ast
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from trainer import config, keys, schedules
from trainer.schema import ON_RESUME, OnResume

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SCHEMA_MODULES = (config, schedules)
SOURCES = sorted(
    p for folder in ("trainer", "launch", "bench", "tests") for p in (REPO / folder).rglob("*.py")
)


def schema_classes() -> list[type]:
    return [
        value
        for module in SCHEMA_MODULES
        for value in vars(module).values()
        if isinstance(value, type)
        and is_dataclass(value)
        and value.__module__ == module.__name__
        and (module is config or issubclass(value, schedules.ScheduleConfig))
    ]


def test_the_readme_key_tables_are_the_schemas() -> None:
    text = README.read_text()
    assert keys.BEGIN in text, "the README lost its generated block"
    assert keys.replace_block(text) == text, "run: python -m trainer.keys --write README.md"


def test_every_key_the_readme_names_exists() -> None:
    named = set(
        re.findall(
            r"`\+?((?:run|train|model|data|schedule|optim|backend|logger)\.[a-z_.]+)", README.read_text()
        )
    )
    known = keys.every_key()
    free_form = ("model.extra.", "backend.extra.")
    named -= {"model.pt"}  # a file in a checkpoint, not a key
    unknown = sorted(
        k for k in named if k not in known and not k.startswith(free_form) and not k.endswith(".")
    )
    assert not unknown, f"the README names keys no schema declares: {unknown}"


@pytest.mark.parametrize("schema", schema_classes(), ids=lambda c: c.__name__)
def test_every_field_has_a_docstring_and_says_what_a_change_on_resume_does(schema: type) -> None:
    undocumented = [name for name, doc in keys.declared_docs(schema).items() if not doc]
    assert not undocumented, f"{schema.__name__}: no docstring where these are declared"
    for declared in fields(schema):
        assert ON_RESUME in declared.metadata, f"{schema.__name__}.{declared.name}: declare it with setting()"


def test_what_a_change_on_resume_does() -> None:
    facts = config.resume_facts(config.compose().to_dict())
    assert facts["train.activation_checkpointing"] is OnResume.applies
    assert facts["train.log_every"] is OnResume.applies
    assert facts["optim.betas"] is OnResume.changes_math
    assert facts["schedule.warmup_ratio"] is OnResume.changes_math
    assert facts["train.seq_len"] is OnResume.refused
    assert facts["model.hidden_size"] is OnResume.refused
    assert facts["optim.no_decay"] is OnResume.refused


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_60_lines() -> None:
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
        for path in SOURCES
        for node in _functions(ast.parse(path.read_text()))
        if node.end_lineno - node.lineno + 1 > 60  # type: ignore[operator]
    ]
    assert not long


def _raised_by(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """Exception classes a function raises itself (not in nested functions), by name."""
    names: set[str] = set()
    stack: list[ast.AST] = list(node.body)
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if (
            isinstance(child, ast.Raise)
            and isinstance(child.exc, ast.Call)
            and isinstance(child.exc.func, ast.Name)
        ):
            names.add(child.exc.func.id)
        stack.extend(ast.iter_child_nodes(child))
    return names


def test_public_functions_say_what_they_raise() -> None:
    silent = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        for node in _functions(ast.parse(path.read_text())):
            if node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node) or ""
            missing = sorted(name for name in _raised_by(node) if name not in doc)
            if missing:
                silent.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} raises {missing}")
    assert not silent


def _imports(path: Path) -> set[str]:
    """The trainer modules a module imports, anywhere in it (type-checking imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("trainer"))
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (REPO / "trainer").rglob("*.py")
    }
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_circle_among_ramps_modules() -> None:
    graph = _module_graph()
    for package in [m for m in graph if any(other.startswith(m + ".") for other in graph)]:
        # a package's __init__ may gather its own submodules; a submodule importing its package is fine
        graph[package] = {m for m in graph[package] if not m.startswith(package + ".")}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_config_imports_no_implementation_module() -> None:
    config_needs = {
        "trainer.errors",
        "trainer.schema",
        "trainer.schedules",
        "trainer.durations",
        "trainer.overrides",  # Hydra's override grammar against the schemas; no torch, no ramp part
    }
    assert _module_graph()["trainer.config"] <= config_needs
    assert _module_graph()["trainer.schedules"] <= {"trainer.errors", "trainer.schema", "trainer.durations"}
    assert _module_graph()["trainer.durations"] <= {"trainer.errors"}
    assert _module_graph()["trainer.overrides"] <= {"trainer.errors"}
