"""Multi-host start-up: `jax.distributed.initialize` from environment variables (a no-op for one process).

Read, first match wins:
  coordinator  CASCADE_COORDINATOR, JAX_COORDINATOR_ADDRESS, or SLURM's first node (SLURM_JOB_NODELIST /
               SLURM_NODELIST) with port CASCADE_COORDINATOR_PORT (default 12355)
  processes    CASCADE_NUM_PROCESSES, JAX_NUM_PROCESSES, SLURM_NTASKS
  process id   CASCADE_PROCESS_ID, JAX_PROCESS_ID, SLURM_PROCID
  local GPUs   CASCADE_LOCAL_DEVICE_IDS (comma list; with one task per GPU under SLURM, SLURM_LOCALID)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax

DEFAULT_PORT = 12355


def _first(env: Mapping[str, str], *names: str) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def first_slurm_host(nodelist: str) -> str:
    """'gpu[03-05,09],cpu1' → 'gpu03' (SLURM's compressed host list; the first host coordinates)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot read the first host")
    prefix, ranges = match.groups()
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def distributed_settings(env: Mapping[str, str] = os.environ) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run."""
    num = _first(env, "CASCADE_NUM_PROCESSES", "JAX_NUM_PROCESSES", "SLURM_NTASKS")
    if num is None or int(num) <= 1:
        return None
    pid = _first(env, "CASCADE_PROCESS_ID", "JAX_PROCESS_ID", "SLURM_PROCID")
    coordinator = _first(env, "CASCADE_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    if coordinator is None:
        nodelist = _first(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if nodelist is None:
            raise ValueError(f"{num} processes but no coordinator: set CASCADE_COORDINATOR=host:port")
        coordinator = f"{first_slurm_host(nodelist)}:{env.get('CASCADE_COORDINATOR_PORT', DEFAULT_PORT)}"
    if pid is None:
        raise ValueError(f"{num} processes but no process id: set CASCADE_PROCESS_ID (0..{int(num) - 1})")
    settings = dict(coordinator_address=coordinator, num_processes=int(num), process_id=int(pid))
    local = _first(env, "CASCADE_LOCAL_DEVICE_IDS")
    if local is not None:
        settings["local_device_ids"] = [int(i) for i in local.split(",")]
    elif env.get("SLURM_LOCALID") and env.get("SLURM_NTASKS_PER_NODE", "1") != "1":
        settings["local_device_ids"] = [int(env["SLURM_LOCALID"])]   # one task per GPU
    return settings


def initialize_distributed(env: Mapping[str, str] = os.environ) -> bool:
    """Join the multi-controller job described by `env`; returns whether it is multi-process.

    Must run before anything touches a JAX backend. CPU processes talk through gloo.
    """
    settings = distributed_settings(env)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    return True
