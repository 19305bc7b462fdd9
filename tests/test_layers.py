"""The package's layers: a module imports only from its own layer or the layers below it.

The layer map lives in one place, the README's "Layout" section: each line of its code block that ends in
`# layer N` lists the files and folders of layer N (`volumes/{io,inference}.py`, `finetuning/`, ...). Every
import in `src/meddinov3_hf` is read with `ast`, including imports inside functions (the lazy ones), and
checked against that map. `KNOWN_VIOLATIONS` lists the upward imports the package has today: a new one fails,
and so does fixing one without removing it from the set.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "meddinov3_hf"
ROOT = "meddinov3_hf"

# (importing module, imported module) pairs that go up a layer today; none are left. Fix a new one by moving
# the code or re-layering the module in the README rather than listing it here.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def layer_map() -> dict[str, int]:
    """Dotted module or package name -> layer, from the README's Layout code block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    layers: dict[str, int] = {}
    for line in block.splitlines():
        match = re.search(r"#\s*layer\s+(\d+)\s*$", line)
        if not match:
            continue
        for token in line[: match.start()].split():
            for path in _expand(token):
                name = path.removesuffix("/").removesuffix(".py").replace("/", ".")
                layers[ROOT if name == "__init__" else f"{ROOT}.{name}"] = int(match.group(1))
    return layers


def _expand(token: str) -> list[str]:
    """`volumes/{io,inference}.py` -> `volumes/io.py`, `volumes/inference.py` (one brace group)."""
    match = re.search(r"\{([^}]*)\}", token)
    if not match:
        return [token]
    return [token[: match.start()] + part + token[match.end() :] for part in match.group(1).split(",")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest mapped prefix (`meddinov3_hf.data.ct3m.build` -> `meddinov3_hf.data`); the
    package itself (its `__init__.py`) only maps itself."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in layers:
            return layers[prefix]
    return layers.get(module) if module == ROOT else None


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module `path` imports, at any depth of the file (function bodies included).

    `from X import name` counts as importing `X.name` when that is a module of the package, else `X`."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def upward_imports() -> set[tuple[str, str]]:
    layers, modules = layer_map(), package_modules()
    violations = set()
    for name, path in modules.items():
        own = layer_of(name, layers)
        for target in imported_modules(path, modules):
            theirs = layer_of(target, layers)
            if own is not None and theirs is not None and theirs > own:
                violations.add((name, target))
    return violations


def test_readme_layout_names_existing_files_only():
    modules = package_modules()
    missing = [m for m in layer_map() if not any(n == m or n.startswith(m + ".") for n in modules)]
    assert not missing, f"README Layout names modules that do not exist: {missing}"


def test_every_module_has_a_layer():
    layers = layer_map()
    unmapped = sorted(m for m in package_modules() if layer_of(m, layers) is None)
    assert not unmapped, f"add these modules to a `# layer N` line of the README's Layout section: {unmapped}"


def test_no_module_imports_from_a_higher_layer():
    found = upward_imports()
    new, fixed = sorted(found - KNOWN_VIOLATIONS), sorted(KNOWN_VIOLATIONS - found)
    assert not new, f"imports from a higher layer (README Layout): {new}"
    assert not fixed, f"fixed, remove from KNOWN_VIOLATIONS: {fixed}"


def test_the_checker_sees_lazy_relative_and_aliased_imports(tmp_path, monkeypatch):
    """The parser itself: function-level, relative (`..`), `from . import module` and absolute imports."""
    pkg = tmp_path / ROOT
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "low.py", "high.py", "sub/__init__.py", "sub/deep.py"):
        (pkg / name).write_text("")
    (pkg / "sub" / "deep.py").write_text(
        "def f():\n    from ..high import thing\n    from .. import low\n    import meddinov3_hf.sub\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    modules = package_modules()
    assert imported_modules(pkg / "sub" / "deep.py", modules) == {
        f"{ROOT}.high",
        f"{ROOT}.low",
        f"{ROOT}.sub",
    }
    layers = {f"{ROOT}.low": 1, f"{ROOT}.sub": 2, f"{ROOT}.high": 3}
    assert layer_of(f"{ROOT}.sub.deep", layers) == 2 and layer_of(f"{ROOT}.other", layers) is None
    assert layer_of(f"{ROOT}.other", {ROOT: 3}) is None and layer_of(ROOT, {ROOT: 3}) == 3


@pytest.mark.parametrize(
    "token, expected",
    [("cli.py", ["cli.py"]), ("volumes/{io,inference}.py", ["volumes/io.py", "volumes/inference.py"])],
)
def test_layout_tokens_expand(token, expected):
    assert _expand(token) == expected
