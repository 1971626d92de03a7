"""DPF with data-parallel (DDP) or sharded (FSDP2) training, one global threshold: the
library's own training loop (``dpf-train``) under torchrun.

    torchrun --nproc_per_node 2 examples/distributed.py            # DDP
    torchrun --nproc_per_node 2 examples/distributed.py --fsdp     # FSDP2 fully_shard

which is ``torchrun --nproc_per_node 2 -m dpf_ext --model mlp ...``. Runs on CPU with gloo,
or on GPUs with NCCL (one per process; pass ``--device cuda``). Each rank trains on its part
of every batch of the bundled digits data; every rank ends with the same masks (checked).
"""

import argparse
import sys

from dpf_ext.app.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdp", action="store_true", help="shard with fully_shard, not DDP")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    args, rest = parser.parse_known_args()
    sys.exit(main(["--model", "mlp", "--sparsity", str(args.sparsity), "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--no-progress",
                   *(["--fsdp"] if args.fsdp else []), *rest]))
