"""A plain torch.distributed training script, the kind any torchrun user writes.

It knows nothing of Drover: env:// rendezvous (MASTER_ADDR/MASTER_PORT, RANK,
WORLD_SIZE), gloo on CPU, data-parallel SGD on a tiny linear model with gradients
averaged by all_reduce. At the end the ranks all_reduce a checksum of their weights and
their rank numbers, and print them, so a test can check that every rank took part and
that all of them hold the same model.

    torchrun --nproc-per-node 2 allreduce_train.py --steps 5
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank exits 3 after step 1 (for failure tests)")
    args = parser.parse_args()

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical initial weights on every rank
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    true_weights = torch.arange(8, dtype=torch.float32) / 8

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data shard
    for step in range(1, args.steps + 1):
        inputs = torch.randn(32, 8, generator=generator)
        targets = inputs @ true_weights + 0.5
        loss = torch.nn.functional.mse_loss(model(inputs).squeeze(-1), targets)
        optimizer.zero_grad()
        loss.backward()
        for parameter in model.parameters():
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad /= world
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
        if rank == 0:
            print(f"step {step}/{args.steps} loss {mean_loss.item() / world:.4f}", flush=True)
        if rank == args.fail_rank and step == 1:
            print(f"rank {rank}: failing on purpose", flush=True)
            # Not SystemExit: torch 2.11's gloo destructors can abort the exit with
            # "terminate called without an active exception" (SIGABRT, not exit code 3;
            # seen in a clean-clone run on 2026-12-02), the same teardown as below.
            sys.stderr.flush()
            os._exit(3)

    rank_sum = torch.tensor([float(rank)])
    dist.all_reduce(rank_sum, op=dist.ReduceOp.SUM)
    weight_checksum = torch.cat([p.detach().flatten() for p in model.parameters()]).sum()
    checksums = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(checksums, weight_checksum)
    agree = all(torch.equal(c, checksums[0]) for c in checksums)
    print(
        f"RESULT rank={rank} world={world} local_rank={os.environ.get('LOCAL_RANK')} "
        f"rank_sum={int(rank_sum.item())} weights_agree={agree} checksum={weight_checksum.item():.6f}",
        flush=True,
    )
    # Meet before leaving: a gloo rank that tears down while a peer is still in a
    # collective can make that peer abort. Then leave without running the process
    # group's destructors: torch 2.11's gloo teardown aborts a rank now and then with
    # "terminate called without an active exception" even after the barrier (seen in
    # about half of the runs of test/local-groups.e2e on 2026-12-02), and there is
    # nothing left to clean up in a process that exits.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
