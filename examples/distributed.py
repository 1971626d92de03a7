"""DPF with data-parallel (DDP) or sharded (FSDP2) training, one global threshold.

    torchrun --nproc_per_node 2 examples/distributed.py            # DDP
    torchrun --nproc_per_node 2 examples/distributed.py --fsdp     # FSDP2 fully_shard

Runs on CPU with gloo, or on GPUs with NCCL (one per process). Each rank trains on its
slice of every batch of the bundled digits data; every rank ends with the same masks.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import dpf_ext
from dpf_ext.data import load_digits
from dpf_ext.models import mlp
from dpf_ext.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="shard with fully_shard, not DDP")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    data = load_digits()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = dpf_ext.sparsify(mlp(data.input_shape, data.num_classes)).to(device)
    steps_per_epoch = len(data.x_train) // args.batch_size
    total = args.epochs * steps_per_epoch
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    pruner = dpf_ext.DPF(model, args.sparsity, total_steps=total)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2, total * 3 // 4], 0.1)
    loss_fn = nn.CrossEntropyLoss()

    gen = torch.Generator().manual_seed(0)  # the same batch order on every rank
    per_rank = args.batch_size // world
    for _ in range(args.epochs):
        order = torch.randperm(len(data.x_train), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size][rank * per_rank:(rank + 1) * per_rank]
            loss = loss_fn(wrapped(data.x_train[idx].to(device)), data.y_train[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            lr_schedule.step()
            pruner.step()

    report = pruner.report()  # the same on every rank: it counts the global model once
    accuracy = evaluate(wrapped, data.x_test, data.y_test)
    if rank == 0:
        print(report)
        print(f"{'FSDP2' if args.fsdp else 'DDP'} on {world} ranks: test accuracy "
              f"{accuracy:.2%}, sparsity {report.sparsity:.2%}")
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
