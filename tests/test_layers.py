"""The layer map of the README holds: imports point inward only.

Each package sits in one layer; a module may import its own package and the layers below its
own, never a layer above or a sibling of its layer (the worlds do not know each other); only
the composition roots on top may use each other. Read from the source with ``ast``, imports
inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import memballoon

#: Lowest first, as the README draws it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("model",),
    ("protocol",),
    ("guest",),
    ("host",),
    ("harness",),
    ("policy",),
    ("manager",),
    ("edge",),
    ("local", "qemu", "sim"),  # the worlds
    ("app", "bench", "cli", "cliargs", "__init__", "__main__"),  # composition roots
)
LAYER_OF = {pkg: i for i, pkgs in enumerate(LAYERS) for pkg in pkgs}
ROOT = Path(memballoon.__file__).parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n.split(".")[1] for n in names
                   if n.startswith("memballoon.") and len(n.split(".")) > 1)
    return out


def violations() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        pkg = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        assert pkg in LAYER_OF, f"{rel}: package {pkg!r} is not on the layer map"
        for dep in _imports(path):
            assert dep in LAYER_OF, f"{rel} imports memballoon.{dep}, not on the layer map"
            top = LAYER_OF[pkg] == len(LAYERS) - 1
            if dep != pkg and LAYER_OF[dep] >= LAYER_OF[pkg] and not top:
                bad.append(f"{rel} ({pkg}, layer {LAYER_OF[pkg]}) imports memballoon.{dep} "
                           f"(layer {LAYER_OF[dep]})")
    return bad


def test_imports_point_inward() -> None:
    assert violations() == []


def test_the_readme_draws_the_same_map() -> None:
    readme = (ROOT.parents[1] / "README.md").read_text()
    drawn = [ln.split()[0].rstrip("/") for ln in readme.split("## Layers", 1)[1].splitlines()
             if ln[:1].isalpha() and ln.split()[0].endswith("/")]
    assert drawn == [pkg for pkgs in LAYERS[:-1] for pkg in pkgs] + ["app"]
