"""Every code block of the README runs as written, in order, in a scratch copy of the repository.

Blocks run with `bash -euo pipefail` (```bash) or the project's Python (```python), from the copy's root,
so later blocks use what earlier ones made (the main job's `runs/sft-tiny`). The copy shares this
checkout's `.venv` (and `.venv-ref` when present); `scripts/setup.sh` in the copy only checks that the
environment is there, because `.ci/run` has just run the real one, and a block right after
`<!-- readme-test: skip (…) -->` is not run (the test-suite commands, which CI runs itself).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\s*)?```(bash|python)\n(.*?)```", re.S)


def readme_blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, code, skipped) for every fenced bash/python block, in order."""
    return [(m.group(2), m.group(3), bool(m.group(1))) for m in BLOCK.finditer(text)]


def _scratch_copy(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    for venv in (".venv", ".venv-ref"):
        if (REPO / venv).exists():
            (target / venv).symlink_to(REPO / venv)
    (target / "scripts" / "setup.sh").write_text(
        "#!/usr/bin/env bash\nset -e\ncd \"$(dirname \"$0\")/..\"\n.venv/bin/python -c 'import cascade_jax'\n")


def test_blocks_are_found():
    blocks = readme_blocks((REPO / "README.md").read_text())
    assert sum(lang == "python" for lang, _, _ in blocks) >= 1
    assert any("cascade-sft --config configs/sft/tiny.yaml" in code for _, code, _ in blocks)
    assert [code for _, code, skipped in blocks if skipped] == [
        code for _, code, _ in blocks if "pytest" in code]   # only the test-suite commands are skipped


@pytest.mark.slow
def test_every_readme_block_runs(tmp_path):
    _scratch_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    for number, (language, code, skipped) in enumerate(readme_blocks((REPO / "README.md").read_text()), 1):
        if skipped:
            continue
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [
            str(REPO / ".venv" / "bin" / "python"), "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2700)
        assert result.returncode == 0, (f"README block {number} ({language}) failed:\n{code}\n--- output ---\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-q"]))
