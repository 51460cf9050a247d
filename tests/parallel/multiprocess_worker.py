"""One process of a multi-controller run on localhost: a few tiny train steps on a mesh, losses as JSON.

    python -m tests.parallel.multiprocess_worker --num-processes 2 --process-id 0 --port 12345 --devices 2
"""

import argparse
import json
import os
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices in this process")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.update(CASCADE_NUM_PROCESSES=str(args.num_processes), CASCADE_PROCESS_ID=str(args.process_id),
                      CASCADE_COORDINATOR=f"127.0.0.1:{args.port}")
    import jax

    from cascade_jax.parallel import initialize_distributed

    initialize_distributed()   # sets the gloo CPU collectives before jax.distributed.initialize
    assert jax.process_count() == args.num_processes

    import numpy as np

    from cascade_jax.parallel import MeshConfig, make_mesh, mesh_context, shard_batch
    from cascade_jax.parallel.sharding import batch_sharding
    from cascade_jax.train.config import OptimizerSection
    from cascade_jax.train.optimizer import build_optimizer
    from cascade_jax.train.state import init_sharded_train_state
    from cascade_jax.train.step import NextTokenLoss, train_step
    from tests.parallel.helpers import small_model

    mesh = make_mesh(MeshConfig(fsdp=2, expert=-1))
    tx = build_optimizer(OptimizerSection(lr=1e-2, warmup_steps=0), args.steps)
    losses = []
    with mesh_context(mesh):
        graphdef, state = init_sharded_train_state(lambda: small_model("all_to_all"), tx, 0, mesh)
        for step in range(args.steps):
            rng = np.random.default_rng(0)   # the same batch each step: the loss must fall
            tokens = rng.integers(1, 256, (1, 8, 17)).astype(np.int32)
            full = {"tokens": tokens[..., :-1], "targets": tokens[..., 1:],
                    "loss_mask": np.ones((1, 8, 16), np.int32), "segment_ids": np.ones((1, 8, 16), np.int32)}
            # This process passes only the rows its devices hold.
            index = batch_sharding(mesh, (1, 8, 16)).addressable_devices_indices_map((1, 8, 16))
            rows = sorted({i for idx in index.values() for i in range(*idx[1].indices(8)[:2])})
            local = {k: v[:, rows[0]:rows[-1] + 1] for k, v in full.items()}
            state, metrics = train_step(state, shard_batch(local, mesh), graphdef=graphdef, tx=tx,
                                        loss_fn=NextTokenLoss(64))
            losses.append(float(metrics["loss"]))
    print("LOSSES " + json.dumps(losses), flush=True)
    jax.distributed.shutdown() if args.num_processes > 1 else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
