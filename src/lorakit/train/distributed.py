"""Training on several processes with torch.distributed, launched by torchrun.

    lorakit train ... --nproc 2                           # starts torchrun on this machine
    torchrun --nproc-per-node 2 -m lorakit train ...      # the same, by hand; add rendezvous flags for nodes

Every process (rank) builds the same adapted model. The data of one step is a *global* batch of N·b
examples (N ranks, b = train.batch_size), drawn by the same `split.batches` as a single process with
batch N·b; rank k takes the k-th slice. With `train.distributed = "ddp"` each rank holds the whole
model and the gradients of the trainable parameters are averaged (frozen weights take no part, and
are not broadcast at start); with `"fsdp"` (FSDP2 `fully_shard`) every weight is sharded across the
ranks and gathered layer by layer for the forward. Either way N ranks × b are one process × N·b.

Rank k's mean loss over its n_k examples is weighted by w_k = n_k·N / G (G = n_0 + … + n_{N-1}), so
the average over ranks of w_k·∇loss_k is the gradient of the mean loss over the whole global batch,
also for the short last batch. A rank whose slice is empty runs the first example with weight 0: it
must still take part in the gradient reduction.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as tdist
from torch import Tensor, nn

Strategy = Literal["ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank of world, and how the model is spread. world 1 is a plain
    single-process run, for which every method below does nothing."""

    rank: int = 0
    world: int = 1
    local_world: int = 1
    strategy: Strategy = "ddp"
    device: torch.device = torch.device("cpu")  # where collectives put their tensors
    owned: bool = False  # this object started the process group, so `close` ends it

    @property
    def main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def lockstep(self) -> bool:
        """Every forward is a collective (FSDP gathers weights), so all ranks must run the same number."""
        return self.world > 1 and self.strategy == "fsdp"

    def shard(self, index: list[int]) -> tuple[list[int], float]:
        """This rank's slice of a global batch and the weight w_k of its mean loss (see the module doc)."""
        if self.world == 1:
            return index, 1.0
        size = math.ceil(len(index) / self.world)
        mine = index[self.rank * size:(self.rank + 1) * size]
        if not mine:
            return index[:1], 0.0
        return mine, len(mine) * self.world / len(index)

    def eval_batches(self, batches: list[list[int]]) -> list[tuple[list[int], bool]]:
        """Evaluation batches of this rank (every N-th, whole), each with whether it counts. Under
        FSDP a rank short of one repeats the first batch uncounted, so the forwards stay in step."""
        mine = [(b, True) for b in batches[self.rank::self.world]]
        if self.lockstep and len(mine) < math.ceil(len(batches) / self.world):
            mine.append((batches[0], False))
        return mine

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def gather(self, state: Tensor) -> list[Tensor]:
        """Each rank's `state` (same shape on all, e.g. torch's RNG state), in rank order, on every rank."""
        if self.world == 1:
            return [state]
        out = [torch.empty_like(state, device=self.device) for _ in range(self.world)]
        tdist.all_gather(out, state.to(self.device))
        return [s.cpu() for s in out]

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def close(self) -> None:
        if self.owned and tdist.is_initialized():
            tdist.destroy_process_group()


def setup(device: torch.device, strategy: Strategy = "ddp") -> Dist:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR, ...);
    without one, a single-process `Dist`. The backend follows the device: nccl for CUDA, gloo for CPU.
    On CPU each rank of a node uses cores / ranks-per-node threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(strategy=strategy)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    owned = not tdist.is_initialized()
    if owned:
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_world, strategy, device, owned)


def wrap(model: nn.Module, dist: Dist, find_unused: bool = False) -> nn.Module:
    """The module the training forward runs through: the model itself (one process), a DDP wrapper
    around it, or the model sharded in place by FSDP2 (each block of every nn.ModuleList, then the root).

    DDP: the trainable parameters are broadcast from rank 0 and their gradients averaged; frozen
    weights are neither (init_sync is off, and DDP skips parameters with requires_grad False).
    find_unused: some trainable parameter may get no gradient (e.g. a module the forward skips)."""
    if dist.world == 1:
        return model
    if dist.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from ..files import base_digest
        from ..layers import LoraLayer

        for m in model.modules():
            if isinstance(m, LoraLayer):
                base_digest(m)  # the adapter file's fingerprint hashes W0: take it while W0 is whole
        blocks = [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]
        for block in blocks:
            fully_shard(block)
        # The root, too, reshards after every forward (FSDP2 keeps it whole by default): the
        # parameters that code outside a forward reads and writes (best weights, adapter, checkpoint)
        # must be the sharded ones, which the next forward gathers.
        fully_shard(model, reshard_after_forward=True)
        return model
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                tdist.broadcast(p.data, 0)
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, init_sync=False, forward_sync_buffers=False,
                                   find_unused_parameters=find_unused)


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """A whole tensor laid out as `param` is: this rank's shard when `param` is a sharded DTensor
    (FSDP) and `full` has its global shape; otherwise `full` itself. No communication: every rank
    holds `full` and cuts its own piece."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and tuple(full.shape) == tuple(param.shape):
        return distribute_tensor(full.detach().to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m lorakit ARGV`: one node, a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorakit", *argv]


def launch(argv: list[str], nproc: int) -> int:
    """Run `lorakit ARGV` as nproc ranks under torchrun on this machine; return torchrun's exit code.

    Ctrl-C reaches torchrun and every rank; they stop together at the next step and rank 0 writes a
    checkpoint, so this process waits for them instead of leaving first. A SIGTERM sent to this
    process is passed on to torchrun, which passes it to the ranks."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    proc = subprocess.Popen(torchrun_command(argv, nproc), env=env)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
