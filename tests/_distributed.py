"""Multi-process tests on CPU: WORLD gloo ranks in spawned processes, each saving its results
for the parent to compare (tests/test_ddp.py, tests/test_parallel.py).

Neither side can hang the suite: the ranks meet through a TCP store on 127.0.0.1 (no file
locks, which some filesystems block on forever), gloo binds to the loopback interface (not to
whatever the machine's hostname resolves to), a rank stuck past RANK_DEADLINE_S prints every thread's stack
and exits, and the parent kills the ranks and fails the test at SPAWN_DEADLINE_S."""
import contextlib
import datetime
import faulthandler
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
RANK_DEADLINE_S = 240   # one rank's whole run (a few seconds here; the spawn's imports included)
SPAWN_DEADLINE_S = 300  # the parent's wait for all ranks


@contextlib.contextmanager
def gloo_group(rank: int, init_method: str):
    """This process as rank ``rank`` of a WORLD-rank gloo group (``init_method``: the
    ``tcp://`` address :func:`run_ranks` passes)."""
    faulthandler.dump_traceback_later(RANK_DEADLINE_S, exit=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        yield
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def save_rank(results, out_dir: str, rank: int) -> None:
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker, tmp_path) -> list:
    """Spawn WORLD processes running ``worker(rank, init_method, out_dir)`` (which ends with
    :func:`save_rank`); returns each rank's saved results, in rank order. A rank that fails
    fails the test with its traceback; ranks still running at SPAWN_DEADLINE_S are killed
    and the test fails."""
    with socket.socket() as probe:  # a free port for rank 0's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(worker, args=(f"tcp://127.0.0.1:{port}", str(tmp_path)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=10):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
            pytest.fail(f"{WORLD} gloo ranks still running after {SPAWN_DEADLINE_S} s: killed "
                        f"(their stacks, if they got that far, are on stderr above)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
