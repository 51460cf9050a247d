"""How a stream ends or stops: a finite set runs out (plain StopIteration), a data set with no usable
record (DataError after one pass, not an endless search), and a signal while `next` waits for data."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from datatest_utils import TOKENIZER, write_jsonl

from cascade_jax.data import TINY_DATA, DataConfig, DataError, PromptConfig, RLPrompts, SFTData, SourceConfig

TINY_SFT = os.path.join(TINY_DATA, "sft.jsonl")
GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]}
BAD = {
    "malformed_json": "{oops",
    "unknown_role": json.dumps({"messages": [{"role": "wizard", "content": "hi"}, GOOD["messages"][1]]}),
    "no_messages": json.dumps({"messages": []}),
}
HINT = "check the files or the chat format"


def _cfg(paths, **kw) -> DataConfig:
    kw = {"max_len": 256, "num_epochs": None, "shard_index": 0, "shard_count": 1, **kw}
    sources = [p if isinstance(p, SourceConfig) else SourceConfig(paths=[p]) for p in paths]
    return DataConfig(sources=sources, **kw)


# --- 1. no usable record -----------------------------------------------------------------------

@pytest.mark.parametrize("reason", sorted(BAD))
@pytest.mark.parametrize("background", [True, False])
def test_no_usable_record_raises_after_one_pass(tmp_path, reason, background):
    path = write_jsonl(str(tmp_path / "bad.jsonl"), [BAD[reason]] * 40)
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        next(iter(SFTData(_cfg([path], tokenize_in_background=background), tokenizer=TOKENIZER)))
    assert time.monotonic() - start < 10
    assert str(e.value) == f"data: no usable record in 1 pass over 40 records of {path} ({reason}: 40); {HINT}"


def test_no_usable_record_names_every_reason_and_file(tmp_path):
    a = write_jsonl(str(tmp_path / "a.jsonl"), [BAD["malformed_json"]] * 30 + [BAD["unknown_role"]] * 10)
    b = write_jsonl(str(tmp_path / "b.jsonl"), [BAD["no_messages"]] * 5)
    with pytest.raises(DataError) as e:
        next(iter(SFTData(_cfg([a, b], tokenize_chunk=7), tokenizer=TOKENIZER)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data: no usable record in 1 pass over 45 records of {a}, {b} (")
    assert "malformed_json: " in msg and "unknown_role: " in msg and "no_messages: " in msg


def test_samples_all_too_long_point_at_max_len(tmp_path):
    path = write_jsonl(str(tmp_path / "long.jsonl"), [GOOD] * 12)
    with pytest.raises(DataError, match=r"\(too_long: 12\); check the files, the chat format or data\.max_len"):
        next(iter(SFTData(_cfg([path], max_len=4), tokenizer=TOKENIZER)))


def test_strict_raises_at_the_first_bad_record(tmp_path):
    path = write_jsonl(str(tmp_path / "bad.jsonl"), [BAD["malformed_json"]] * 40)
    with pytest.raises(DataError) as e:
        next(iter(SFTData(_cfg([path], strict=True, shuffle=False), tokenizer=TOKENIZER)))
    assert str(e.value).startswith(f"{path}:1: malformed_json: ")


def test_one_bad_source_among_good_ones_is_only_skipped(tmp_path):
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [BAD["malformed_json"]] * 40)
    good = write_jsonl(str(tmp_path / "good.jsonl"), [GOOD] * 5)
    data = SFTData(_cfg([bad, good], max_docs_per_row=1, num_packing_bins=1), tokenizer=TOKENIZER)
    it = iter(data)
    for _ in range(50):
        next(it)
    assert data.stats(it)["malformed_json"] > 100


def test_rare_usable_records_are_not_an_error(tmp_path):
    """One good record among many bad ones: passes that start mid-epoch may miss it; not an error."""
    path = write_jsonl(str(tmp_path / "rare.jsonl"), [BAD["malformed_json"]] * 29 + [GOOD])
    it = iter(SFTData(_cfg([path], max_docs_per_row=1, num_packing_bins=1, log_first=0), tokenizer=TOKENIZER))
    for _ in range(40):  # 40 epochs, one document each
        next(it)


def test_rl_prompts_with_no_usable_record_raise(tmp_path):
    path = write_jsonl(str(tmp_path / "rl.jsonl"), ["nope"] * 10)
    cfg = PromptConfig(sources=[SourceConfig(paths=[path])], num_epochs=None, shard_index=0, shard_count=1)
    with pytest.raises(DataError) as e:
        next(iter(RLPrompts(cfg, tokenizer=TOKENIZER)))
    assert str(e.value) == (f"data: no usable record in 1 pass over 10 records of {path} (malformed_json: 10); "
                            "check the files or the prompt format")


@pytest.mark.slow
def test_no_usable_record_in_worker_processes(tmp_path):
    path = write_jsonl(str(tmp_path / "bad.jsonl"), [BAD["malformed_json"]] * 40)
    it = iter(SFTData(_cfg([path], worker_count=2), tokenizer=TOKENIZER))
    with pytest.raises(DataError) as e:
        next(it)
    it.close()
    assert str(e.value) == (f"data: no usable record in 1 pass over 40 records of {path} "
                            f"(this shard read 20: malformed_json: 20); {HINT}")
    assert not multiprocessing.active_children()


# --- 2. a finite stream runs out --------------------------------------------------------------

def _exhaust(it) -> int:
    n = 0
    while True:
        try:
            next(it)
        except StopIteration:
            return n
        n += 1


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("records", [3000, 20])  # many packing groups / a single one
def test_finite_stream_ends_with_plain_stop_iteration(tmp_path, capfd, drop_remainder, records):
    path = TINY_SFT
    if records < 3000:
        with open(TINY_SFT) as f:
            path = write_jsonl(str(tmp_path / "few.jsonl"), [next(f).rstrip("\n") for _ in range(records)])
    data = SFTData(_cfg([path], max_len=1024, batch_size=4 if records == 3000 else 1, num_epochs=1.0,
                        drop_remainder=drop_remainder), tokenizer=TOKENIZER)
    it = iter(data)
    n = _exhaust(it)
    assert n >= 1
    with pytest.raises(StopIteration):  # and again: the iterator protocol
        next(it)
    state = it.get_state()
    json.dumps(state)
    again = iter(data)
    again.set_state(state)  # the end restores to the end
    with pytest.raises(StopIteration):
        next(again)
    it.close()
    again.close()
    assert "Traceback" not in capfd.readouterr().err
    assert data.describe(it).startswith(f"{records} records in 1 source ({os.path.basename(path)}: {records}); "
                                        f"{records} per epoch for this process, num_epochs=1 → {records} in all; "
                                        "skipped 0")


_EXHAUST_SCRIPT = """
import sys
from cascade_jax.data import DataConfig, SFTData, SourceConfig
def main():
    cfg = DataConfig(sources=[SourceConfig(paths=[{path!r}])], max_len=1024, batch_size=4, num_epochs=1.0,
                     drop_remainder=False, worker_count={workers}, shard_index=0, shard_count=1)
    it = iter(SFTData(cfg))
    n = sum(1 for _ in it)
    print("batches", n, flush=True)
    # no close(): the iterator is collected at exit
if __name__ == "__main__":
    main()
"""


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_running_out_prints_nothing(workers):
    script = textwrap.dedent(_EXHAUST_SCRIPT).format(path=TINY_SFT, workers=workers)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "batches" in out.stdout, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr[-2000:]


# --- 4. a signal while next() waits -----------------------------------------------------------

class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def slow_file(tmp_path_factory):
    """Many bad lines before the good ones: the first batch takes seconds (no error: not a dry pass)."""
    path = str(tmp_path_factory.mktemp("slow") / "slow.jsonl")
    with open(path, "w") as f:
        f.write("{oops\n" * 300_000)
        f.write((json.dumps(GOOD) + "\n") * 50)
    return path


def _alarm_when_running(workers: int, after: float, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(multiprocessing.active_children()) < workers and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(after)
    os.kill(os.getpid(), signal.SIGALRM)


def _interrupted_next(it, after: float, *, workers: int = 0) -> float:
    """Seconds from a SIGALRM whose handler raises to the exception leaving ``next(it)``; the alarm
    comes ``after`` seconds after ``next`` starts or, with ``workers``, after that many worker
    processes are up (a signal while one is being spawned cuts its start-up pickle short)."""
    fired = []

    def handler(signum, frame):
        fired.append(time.monotonic())
        raise _Interrupt

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        if workers:
            threading.Thread(target=_alarm_when_running, args=(workers, after), daemon=True).start()
        else:
            signal.setitimer(signal.ITIMER_REAL, after)
        with pytest.raises(_Interrupt):
            next(it)
        return time.monotonic() - fired[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("background", [True, False])
def test_signal_interrupts_waiting_for_data(slow_file, background):
    it = iter(SFTData(_cfg([slow_file], shuffle=False, log_first=0, tokenize_in_background=background),
                      tokenizer=TOKENIZER))
    assert _interrupted_next(it, 0.5) < 1.0
    start = time.monotonic()
    it.close()
    del it
    assert time.monotonic() - start < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("while_starting", [True, False])
def test_signal_interrupts_waiting_for_worker_processes(slow_file, while_starting):
    """Early, the signal cuts a worker's start-up short (Grain starts it again while closing); later,
    the workers are in the middle of an element."""
    it = iter(SFTData(_cfg([slow_file], shuffle=False, log_first=0, worker_count=2), tokenizer=TOKENIZER))
    assert _interrupted_next(it, 1.0, workers=0 if while_starting else 2) < 1.0
    start = time.monotonic()
    it.close()
    del it
    assert time.monotonic() - start < 10
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()
