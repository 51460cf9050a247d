"""What is alive at the memory peak of a compiled step, from XLA's own dump.

With `--xla_dump_to=DIR`, XLA writes `*-live-range.txt` per module; its "Stack trace breakdown for peak
usage" section lists every buffer live at the peak under the JAX operation that made it. Summing those
by operation answers "what fills the device?", which is how the planner's own memory problems were found
(all-gathers hoisted to the start of the step, loop outputs allocated for every layer at once).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

_SECTION = "Stack trace breakdown for peak usage"
# A direct child of the module's root: six spaces, a tree branch, the name, then "(…%, total: N bytes".
_ENTRY = re.compile(r"^ {6}[├└]── (?P<name>.+?) \([\d.]+%, total: (?P<bytes>[\d ]+) bytes")
_NOISE = ("jit(train_step)/", "while/body/", "eval_jaxpr/")


def peak_breakdown(text: str) -> list[tuple[str, int]]:
    """[(operation, bytes)] live at the peak, largest first, equal operations summed."""
    start = text.find(_SECTION)
    if start < 0:
        return []
    totals: collections.Counter[str] = collections.Counter()
    for line in text[start:].splitlines()[2:]:
        if not line.startswith(" " * 6):
            break
        match = _ENTRY.match(line)
        if match:
            totals[_short(match["name"])] += int(match["bytes"].replace(" ", ""))
    return totals.most_common()


def _short(name: str) -> str:
    """Drop the step's common prefixes; fold the train state's leaves into `state` / `state.opt_state`
    and XLA's own unnamed buffers (`copy.12`, `ynn_fusion.3`) into one entry per kind."""
    for prefix in _NOISE:
        name = name.replace(prefix, "")
    if name.startswith("state"):
        return name.split("[")[0]
    if "/" not in name:
        return re.sub(r"\.\d+$", "", name)
    return name


def read_peak_breakdown(dump_dir: str | Path, module: str = "train_step") -> list[tuple[str, int]]:
    """The breakdown of the dumped module whose name contains `module` (empty if XLA wrote none)."""
    files = sorted(Path(dump_dir).glob(f"*{module}*live-range.txt"))
    return peak_breakdown(files[-1].read_text()) if files else []


def format_breakdown(entries: list[tuple[str, int]], top: int) -> str:
    if not entries:
        return "largest at the peak: XLA wrote no peak breakdown for this step"
    peak = sum(size for _, size in entries)
    lines = [f"largest at the peak (of {_size(peak)} XLA-managed):"]
    lines += [f"  {_size(size):>10}  {size / peak:5.1%}  {name}" for name, size in entries[:top]]
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
