"""design.md §2: dependencies point down (cli → rl → train → inference/data/weights → model → ops; rl runs
its GRPO stage on train's loop and step, so it sits above train), `parallel`
and `config` import no other package of cascade_jax, and nothing imports `cli`. Read from the source (ast),
so an import inside a function counts too."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cascade_jax"
# a package may import only packages of a strictly lower level
LEVEL = {"config": 0, "parallel": 0, "ops": 1, "model": 2, "inference": 3, "data": 3, "weights": 3,
         "train": 4, "rl": 4.5, "cli": 5,
         "<top>": 3.5}   # `import cascade_jax` itself (config, model, load_pretrained): for train, rl and cli


def _imports(path: Path) -> set[str]:
    """The cascade_jax subpackages a file imports (absolute imports; the project uses no relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("cascade_jax.")}
        found |= {"<top>" for n in names if n == "cascade_jax"}
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            if parts[0] == "config.py":
                bad += [f"config.py imports {dep}" for dep in _imports(path)]
            continue
        owner = parts[0]
        assert owner in LEVEL, f"cascade_jax/{owner}: a new package needs a level in this test and design.md"
        for dep in _imports(path) - {owner}:
            if LEVEL.get(dep, 99) >= LEVEL[owner]:
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports cascade_jax.{dep}")
    return bad


def test_dependencies_point_down():
    assert _violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "cascade_jax"
    (fake / "parallel").mkdir(parents=True)
    (fake / "parallel" / "bad.py").write_text("def f():\n    from cascade_jax.ops.ssd import ssd_chunked\n")
    (fake / "ops").mkdir()
    (fake / "ops" / "fine.py").write_text("from cascade_jax.parallel.rules import constrain\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _violations() == ["cascade_jax/parallel/bad.py imports cascade_jax.ops"]
