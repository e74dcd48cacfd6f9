"""Training on several processes and machines, through Lightning: Fabric starts the processes and
the process group (gloo on CPUs, NCCL on GPUs), the Trainer then fits under DDP in the same group.

    covid-cxr train ... --devices 2                      # 2 processes here (Lightning starts the 2nd)
    torchrun --nnodes 2 --nproc-per-node 4 -m covid_cxr train ... --devices 4 --num-nodes 2
    srun covid-cxr train ... --devices 4 --num-nodes 2   # SLURM: Lightning reads its variables

Lightning finds torchrun's and SLURM's processes itself; alone, it re-runs the same command line
for the other local ranks. Everything rank-specific in training goes through `Dist`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from covid_cxr.core.config import TrainConfig


@dataclass
class Dist:
    """This process's place: rank among `world` processes and the device it computes on."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every rank's `obj` (any picklable value), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def strategy(cfg: TrainConfig) -> str:
    return "ddp" if cfg.world_size > 1 else "auto"


def single_device(cfg: TrainConfig) -> torch.device:
    use_gpu = cfg.accelerator == "gpu" or (cfg.accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_gpu else "cpu")


def launch(cfg: TrainConfig) -> Dist:
    """Start (or join) the processes of a multi-process run; a one-process run starts nothing."""
    if cfg.world_size == 1:
        return Dist(device=single_device(cfg))
    import lightning as L

    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                      strategy=strategy(cfg))
    fabric.launch()  # alone: re-runs this command line for the other local ranks, then joins the group
    return Dist(fabric.global_rank, fabric.world_size, fabric.device)
