"""Failure-injecting reward kinds for the RewardPool tests (loaded in workers through ``extra_modules``)."""

from __future__ import annotations

import os
import signal
import time


def _hang(response: str, metadata: dict) -> tuple[float, dict]:
    time.sleep(3600)
    return 1.0, {}


def _exit(response: str, metadata: dict) -> tuple[float, dict]:
    os._exit(3)


def _segfault(response: str, metadata: dict) -> tuple[float, dict]:
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)
    return 1.0, {}


def _raise(response: str, metadata: dict) -> tuple[float, dict]:
    raise RuntimeError("injected failure\nsecond line")


def _pid(response: str, metadata: dict) -> tuple[float, dict]:
    return 1.0, {"pid": os.getpid()}


REWARDS = {"test_hang": _hang, "test_exit": _exit, "test_segfault": _segfault, "test_raise": _raise,
           "test_pid": _pid}
