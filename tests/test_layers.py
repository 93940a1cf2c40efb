"""The package's import arrows point down only (DESIGN.md's layers), and the README's layout is the tree.

Every `import` in fastcram/ is read from the source (those inside functions too), resolved to a module of
the package and checked against the layer it may use.
"""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastcram")

BASE = {"config", "errors", "files"}  # leaves: import no other fastcram module
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "cli": {"glue", "benchmarks", "export", "train", "model", "ops", "data", "observe", "base"},
    "glue": {"train", "model", "ops", "data", "observe", "base"},
    "benchmarks": {"train", "model", "ops", "data", "observe", "base"},
    "export": {"train", "model", "ops", "data", "observe", "base"},
    "train": {"model", "ops", "data", "observe", "base"},
    "model": {"ops", "base"},
    "ops": {"base"},
    "data": {"base"},
    "observe": {"base"},
    "base": set(),
}


def layer_of(module: str) -> str:
    """'fastcram.train.loop' -> 'train'; 'fastcram.config' -> 'base'."""
    parts = module.split(".")
    assert parts[0] == "fastcram", module
    if len(parts) == 1:
        return "base"  # the package's own __init__ (version only)
    top = parts[1]
    if top in BASE:
        return "base"
    if top in ("cli", "__main__"):
        return "cli"
    if top in ALLOWED:
        return top
    raise AssertionError(f"{module}: not in any layer of DESIGN.md; give it a folder or add it to the test")


def module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imports_of(path: str, root: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every fastcram import in one file, those inside functions included."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    me = module_name(path, root)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "fastcram"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fastcram":
                continue
            # `from . import x` and `from .pkg import mod` name modules too
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((node.lineno, sub if _is_module(sub, root) else target))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("fastcram"):
                found.append((node.lineno, arg.value))
    return found


def _is_module(name: str, root: str) -> bool:
    rel = os.path.join(os.path.dirname(root), *name.split("."))
    return os.path.isfile(rel + ".py") or os.path.isfile(os.path.join(rel, "__init__.py"))


def violations(root: str) -> list[str]:
    bad = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            me = module_name(path, root)
            mine = layer_of(me)
            for line, target in imports_of(path, root):
                theirs = layer_of(target)
                if theirs != mine and theirs not in ALLOWED[mine]:
                    bad.append(f"{os.path.relpath(path, os.path.dirname(root))}:{line}: {mine} imports "
                               f"{target} ({theirs})")
                if mine == "base" and target != me and target != "fastcram":
                    bad.append(f"{os.path.relpath(path, os.path.dirname(root))}:{line}: {me} is a leaf but "
                               f"imports {target}")
    return bad


def test_no_import_runs_upward():
    assert violations(PKG) == []


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("rel,text", [
    ("fastcram/ops/x.py", "def f():\n    from ..model import M\n"),  # lazy, relative, upward
    ("fastcram/data/x.py", "from fastcram.train import loop\n"),
    ("fastcram/observe/x.py", "import fastcram.glue.finetune\n"),
    ("fastcram/config.py", "from .errors import UserError\n"),  # leaves import nothing
    ("fastcram/model.py", "import importlib\nimportlib.import_module('fastcram.train.loop')\n"),
    ("fastcram/train/x.py", "from .. import cli\n"),
])
def test_the_checker_finds_upward_imports(tmp_path, rel, text):
    """The walker itself: each planted upward arrow (lazy, relative, dynamic) is reported."""
    root = tmp_path / "fastcram"
    for mod in ("__init__.py", "ops/__init__.py", "data/__init__.py", "observe/__init__.py", "train/__init__.py",
                "train/loop.py", "glue/__init__.py", "glue/finetune.py", "model.py", "cli.py", "config.py",
                "errors.py"):
        _write(str(tmp_path), os.path.join("fastcram", mod), "")
    _write(str(tmp_path), rel, text)
    found = violations(str(root))
    assert len(found) == 1 and found[0].startswith(rel + ":"), found


def test_readme_layout_matches_the_tree():
    """Every path the README's layout names exists, and every subpackage and top-level module is named."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", readme, re.S).group(1)
    named, stack = set(), []
    for line in block.splitlines():
        m = re.match(r"( *)(\S+)", line)
        if not m:
            continue
        depth, entry = len(m.group(1)) // 2, m.group(2)
        stack = stack[:depth] + [entry]
        path = "".join(stack)
        named.add(path.rstrip("/"))
        assert os.path.exists(os.path.join(ROOT, path)), f"README layout names {path}, which does not exist"
    top = {f"fastcram/{n}" for n in os.listdir(PKG) if (n.endswith(".py") and not n.startswith("__")) or
           os.path.isfile(os.path.join(PKG, n, "__init__.py"))}
    assert top - named == set(), f"README layout misses {sorted(top - named)}"
