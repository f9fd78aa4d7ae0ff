"""nnsqueeze.distributed: sharding and no-op behaviour in one process; a real 2-rank torchrun run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nnsqueeze import distributed as dd
from nnsqueeze.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_shard_gives_every_world_size_th_batch_and_equal_counts():
    data = list(range(11))
    shards = [list(dd.Shard(data, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 9, 10 dropped: equal step counts per rank
    assert [len(dd.Shard(data, r, 3)) for r in range(3)] == [3, 3, 3]
    assert list(dd.Shard(data, 0, 1)) == data

    class NoLen:  # re-iterable without __len__ (e.g. an IterableDataset loader): counted by one pass
        def __iter__(self):
            return iter(range(5))

    assert len(dd.Shard(NoLen(), 1, 2)) == 2 and list(dd.Shard(NoLen(), 1, 2)) == [1, 3]
    with pytest.raises(DataError, match="2 batch"):
        dd.Shard([0, 1], 0, 3)


def test_single_process_helpers_are_no_ops(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    m = nn.Linear(2, 2)
    assert not dd.is_distributed() and dd.rank() == 0 and dd.world_size() == 1 and dd.is_main()
    assert dd.init("cpu") == torch.device("cpu")
    assert dd.wrap(m, torch.device("cpu")) is m and dd.unwrap(m) is m
    assert dd.mean(2.5) == 2.5
    assert not dd.synced()
    y = torch.randn(5, 3, 7, dtype=torch.float64)
    mu, var, n = dd.batch_moments(y, [0, 2])                    # plain moments in one process
    assert n == 35 and torch.equal(mu, y.mean([0, 2])) and torch.equal(var, y.var([0, 2], unbiased=False))
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(0.5)
    dd.broadcast_buffers(bn)                                    # no group: buffers untouched
    assert torch.equal(bn.running_mean, torch.full((3,), 0.5))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dd.launched() and dd.rank() == 1 and dd.world_size() == 2 and not dd.is_main()


@pytest.mark.slow
def test_torchrun_two_ranks_agree_and_match_single_process_reference(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # 1. Both ranks end with identical weights and masks (DDP averaged the gradients).
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["figures"]["world_size"] == 2 and r0["figures"]["steps"] == 6

    # 2. Independent reference: one process, each batch pair (2i, 2i+1) concatenated. With equal
    #    batch sizes, mean-over-ranks of per-rank mean-loss gradients is the gradient on the union.
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import ddp_worker
    finally:
        sys.path.remove(str(ROOT / "tests"))
    b = ddp_worker.make_batches()
    merged = [(torch.cat([b[i][0], b[i + 1][0]]), torch.cat([b[i][1], b[i + 1][1]])) for i in range(0, 8, 2)]
    ref, _ = ddp_worker.train(merged)
    init = ddp_worker.make_model().state_dict()
    for k, v in ref.state_dict().items():
        assert torch.allclose(r0["state"][k].float(), v.float(), atol=1e-5), k
    # 3. Training changed the weights; pruned entries stayed zero.
    assert not torch.allclose(r0["state"]["0.weight"], init["0.weight"])
    for name in ("0", "2"):
        mask = r0["state"][f"{name}.weight_mask"]
        assert (r0["state"][f"{name}.weight"][~mask] == 0).all()
    total = sum(r0["state"][f"{n}.weight_mask"].numel() for n in ("0", "2"))
    zeros = sum(int((~r0["state"][f"{n}.weight_mask"]).sum()) for n in ("0", "2"))
    assert zeros == round(0.5 * total)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["rank0.pt", "rank1.pt"]
