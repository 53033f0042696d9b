"""Two gloo processes on the CPU: the memory banks and SOP draws stay identical across ranks."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memory import MemoryBank


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same seed on every rank: identical random initial memory
    bank = MemoryBank(12, 4)
    for step in range(4):  # 4 enqueues of 2 x 2 rows = 16 rows: wraps around the 12-row memory once
        local = torch.full((2, 4), float(100 * step + 10 * rank)) + torch.arange(2.0).unsqueeze(1)
        bank.enqueue(local, local[:, 0].long() + 1000)  # the dataset index travels with its row: value + 1000
    sops = bank.draw(3, 2, 0.1, torch.Generator().manual_seed(1234))
    torch.save({"memory": bank.memory, "index": bank.index, "ptr": bank.ptr, "support": sops.support,
                "weights": sops.weights, "rows": sops.rows}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_identical_memories_and_sops(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    # Global batch of step s: rank 0's rows (100 s, 100 s + 1) then rank 1's (100 s + 10, 100 s + 11).
    rows = [torch.tensor([100. * s + 10 * r + i for r in range(2) for i in range(2)]) for s in range(4)]
    order = torch.cat(rows)  # 16 rows written FIFO into 12 slots: the last 4 overwrite slots 0-3
    expected = torch.cat((order[12:16], order[4:12]))
    assert torch.equal(r0["memory"][:, 0], expected)
    assert torch.equal(r0["index"], expected.long() + 1000)  # gathered in the same rank order as the embeddings
    assert r0["ptr"].item() == 4
