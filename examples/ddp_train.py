"""Data-parallel training with synchronized batch norm on bn_cuda's kernels.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node=2 examples/ddp_train.py --keras    # Keras layers, synchronized=True

A small conv net learns a synthetic 10-class task. Its torch ``BatchNorm2d`` layers are converted
to :class:`bn_cuda.nn.SyncBatchNorm` (``--keras``: it uses ``bn_cuda.BatchNormalization(
synchronized=True)`` instead), so batch statistics are those of the global batch over all
processes. Ranks get different batch sizes on purpose: the statistics stay exact. At the end the
running statistics are compared across ranks (they must be identical).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bn_cuda
from bn_cuda.nn import SyncBatchNorm


def make_model(keras: bool) -> nn.Module:
    def norm(channels: int) -> nn.Module:
        if not keras:
            return nn.BatchNorm2d(channels)  # converted below
        layer = bn_cuda.BatchNormalization(axis=1, momentum=0.9, epsilon=1e-5, synchronized=True)
        layer.build([None, channels, None, None])  # DDP needs the parameters before the first step
        return layer

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), norm(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    return SyncBatchNorm.convert_sync_batchnorm(model)


def synthetic_batch(batch: int, step: int, rank: int, device: torch.device):
    """Noisy copies of 10 fixed random class templates (the same templates on every rank)."""
    templates = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(100_000 * rank + step)
    y = torch.randint(0, 10, (batch,), generator=g)
    x = templates[y] + 1.5 * torch.randn(batch, 3, 16, 16, generator=g) + 0.5
    return x.to(device), y.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="per-process batch size of rank 0 (rank r: + 4 r)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--keras", action="store_true", help="bn_cuda.BatchNormalization(synchronized=True)")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts them)

    model = make_model(args.keras).to(device)
    if use_cuda:
        model = model.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    batch = args.batch + 4 * rank  # uneven on purpose
    if rank == 0:
        kind = "bn_cuda.BatchNormalization(synchronized=True)" if args.keras else "bn_cuda.nn.SyncBatchNorm"
        print(f"{world} processes ({dist.get_backend()}, {device.type}), {kind}, "
              f"global batch {sum(args.batch + 4 * r for r in range(world))}", flush=True)

    for step in range(args.steps):
        x, y = synthetic_batch(batch, step, rank, device)
        if use_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:4d}  loss {mean_loss.item() / world:.4f}", flush=True)

    # Every rank normalized with the same global statistics, so their running statistics agree.
    stats = torch.cat([b.detach().float().reshape(-1) for n, b in model.named_buffers()
                       if n.endswith(("running_mean", "running_var", "moving_mean", "moving_variance"))])
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        same = all(torch.equal(gathered[0], g) for g in gathered[1:])
        print(f"running statistics identical across ranks: {same}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
