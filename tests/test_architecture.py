"""The package's layering, read from the source (every import, including those inside functions):
core and datasets import no family; the families import each other only video -> diffusion, and never evals
or demo; nothing imports the CLI; no module imports another module's private names; no sys.exit below cli.py."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmalign"
FAMILIES = {"diffusion", "mllm", "video"}
# area -> areas it must not import
FORBIDDEN = {
    "core": FAMILIES | {"datasets", "evals", "demo", "cli"},
    "assets": FAMILIES | {"core", "datasets", "evals", "demo", "cli"},
    "datasets": FAMILIES | {"evals", "demo", "cli"},
    "diffusion": {"mllm", "video", "evals", "demo", "cli"},
    "mllm": {"diffusion", "video", "evals", "demo", "cli"},
    "video": {"mllm", "evals", "demo", "cli"},
    "evals": {"demo", "cli"},
    "demo": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, imported names, line) for every import statement and __import__("...") in `path`."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant):
            yield node.args[0].value, [], node.lineno


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_imports_follow_the_layers():
    bad = []
    for path in SOURCES:
        src = area(module_name(path))
        for target, _, line in imports(path):
            if target.startswith("mmalign.") and area(target) in FORBIDDEN.get(src, set()):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for path in SOURCES:
        for target, names, line in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.startswith("mmalign") and private:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_no_sys_exit_below_the_cli():
    bad = []
    for path in SOURCES:
        if path == PACKAGE / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", "") == "sys":
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bad, "sys.exit outside mmalign/cli.py: " + ", ".join(bad)


@pytest.mark.parametrize("source,target,allowed", [
    ("mmalign/core/x.py", "mmalign.diffusion.losses", False), ("mmalign/video/x.py", "mmalign.diffusion.pipeline", True),
    ("mmalign/mllm/x.py", "mmalign.evals.stats", False), ("mmalign/evals/x.py", "mmalign.mllm.models", True),
])
def test_the_checker_itself(source, target, allowed):
    src = area(module_name(PACKAGE.parent / source))
    assert (area(target) not in FORBIDDEN[src]) is allowed
