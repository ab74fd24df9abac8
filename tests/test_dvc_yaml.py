"""dvc.yaml against the code: each stage's deps are its import closure inside pipeline/ plus
its data, and every path it reads or writes appears in its command."""

import ast
import re
import shlex

import yaml

from .conftest import ROOT

# `python -m pipeline <command>` -> the stage module it runs (a path under pipeline/, no .py)
COMMANDS = {
    "audit": "stages/audit",
    "ingest": "stages/ingest",
    "clean": "stages/clean",
    "augment": "stages/augment",
    "init-pseudo": "stages/pseudolabel",
    "train": "stages/train",
    "evaluate": "stages/evaluate",
    "pseudolabel": "stages/pseudolabel",
    "summarize": "stages/summarize",
    "dataset": "stages/dataset",
}
STAGE_MODULES = set(COMMANDS.values())  # the modules dvc.yaml runs


def imports_of(module: str) -> set[str]:
    """pipeline modules (paths under pipeline/, no .py) `module` imports anywhere in its
    source, functions included: `from pipeline.core.io import x` and `from pipeline.core
    import io` both name core/io."""
    tree = ast.parse((ROOT / "pipeline" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            parts = node.module.split(".")[1:]
            for alias in node.names:
                candidate = "/".join([*parts, alias.name])
                found.add(
                    candidate
                    if (ROOT / "pipeline" / f"{candidate}.py").is_file()
                    else "/".join(parts)
                )
        elif isinstance(node, ast.Import):
            found |= {
                "/".join(a.name.split(".")[1:])
                for a in node.names
                if a.name.startswith("pipeline.")
            }
    return {m for m in found if m and (ROOT / "pipeline" / f"{m}.py").is_file()}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(imports_of(name))
    return seen


def stages():
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        yield name, stage.get("do", stage)


def test_every_stage_depends_on_exactly_its_import_closure():
    problems = []
    for name, stage in stages():
        command = re.search(r"python -m pipeline ([\w-]+)", stage["cmd"]).group(1)
        expected = {f"pipeline/{m}.py" for m in closure(COMMANDS[command])}
        listed = {d for d in stage["deps"] if d.startswith("pipeline/")}
        for path in sorted(expected - listed):
            problems.append(f"{name}: missing dep {path}")
        for path in sorted(listed - expected):
            problems.append(f"{name}: extra dep {path}")
    assert not problems, "\n".join(problems)


def test_no_stage_module_imports_another():
    for module in STAGE_MODULES:
        others = imports_of(module) & (STAGE_MODULES - {module})
        assert not others, f"pipeline/{module}.py imports stage module(s) {sorted(others)}"


def command_paths(cmd: str) -> set[str]:
    """The values of a command's options: `--out artifacts/x` -> artifacts/x."""
    tokens = shlex.split(cmd)
    return {b for a, b in zip(tokens, tokens[1:]) if a.startswith("--") and not b.startswith("-")}


def test_every_path_a_stage_reads_or_writes_is_in_its_command():
    problems = []
    for name, stage in stages():
        given = command_paths(stage["cmd"])
        paths = [d for d in stage["deps"] if not d.startswith("pipeline/")]
        for section in ("outs", "metrics", "plots"):
            paths += [next(iter(o)) if isinstance(o, dict) else o for o in stage.get(section, [])]
        for path in paths:
            # named by the command itself, or inside a folder the command is given
            if not any(path == g or path.startswith(g.rstrip("/") + "/") for g in given):
                problems.append(f"{name}: {path} is not in its command")
    assert not problems, "\n".join(problems)


def test_every_value_interpolated_into_a_command_is_quoted():
    """DVC runs `cmd` through a shell: a value from params.yaml (a pool name) is one quoted
    word, whatever it holds, even if the name rule were bypassed."""
    for name, stage in stages():
        for token in stage["cmd"].split():
            if "${" in token:
                assert re.fullmatch(r"'[^']*'", token), f"{name}: {token} is not quoted"


def test_the_path_check_catches_an_unnamed_path():
    given = command_paths("python -m pipeline x --out artifacts/x --data-dir data")
    assert given == {"artifacts/x", "data"}
    assert not any("artifacts/bogus/y.csv".startswith(g + "/") for g in given)
