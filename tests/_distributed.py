"""Multi-process tests on CPU: WORLD gloo ranks in spawned processes, each saving its results
for the parent to compare (tests/test_ddp.py, tests/test_parallel.py)."""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


@contextlib.contextmanager
def gloo_group(rank: int, init_file: str):
    """This process as rank ``rank`` of a WORLD-rank gloo group (file rendezvous)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        yield
    finally:
        dist.destroy_process_group()


def save_rank(results, out_dir: str, rank: int) -> None:
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker, tmp_path) -> list:
    """Spawn WORLD processes running ``worker(rank, init_file, out_dir)`` (which ends with
    :func:`save_rank`); returns each rank's saved results, in rank order."""
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
             join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
