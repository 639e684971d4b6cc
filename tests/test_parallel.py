"""moecompress.parallel: the owner assignment, and results shared bit for bit between 2 gloo processes."""

from __future__ import annotations

import os

import pytest
import torch

from dist_util import spawn_and_collect

from moecompress.parallel import Ranks, owners, share_results


def test_owners_balance_by_cost_and_are_deterministic():
    costs = [10, 1, 1, 1, 7, 3, 3, 1]
    owner = owners(costs, 2)
    assert owner == owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert max(load) - min(load) <= 1  # LPT reaches 14/13 here
    assert owners(costs, 1) == [0] * len(costs)
    assert sorted(set(owners([1.0] * 5, 8))) == [0, 1, 2, 3, 4]  # more ranks than units: one each
    with pytest.raises(ValueError):
        owners(costs, 0)


def test_single_process_shares_nothing():
    mine = {0: ({"a": torch.ones(2)}, "row")}
    assert share_results(mine, [0], Ranks()) == mine


def _unit_tensors(unit: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(unit)
    return {
        "qweight": torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32, generator=g),
        "scales": torch.randn(2, 5, generator=g).to(torch.float16),
        "zeros": torch.randint(0, 255, (2, 5), dtype=torch.uint8, generator=g),
        "weight": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 7),
    }


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        owner = owners([5, 4, 3, 3, 2, 1], world)
        mine = {u: (_unit_tensors(u), {"unit": u, "by": rank}) for u, r in enumerate(owner) if r == rank}
        shared = share_results(mine, owner, Ranks(rank, world))
        ok = sorted(shared) == list(range(6))
        for u, (tensors, extra) in shared.items():
            expected = _unit_tensors(u)
            ok &= extra == {"unit": u, "by": owner[u]} and set(tensors) == set(expected)
            ok &= all(tensors[k].dtype == v.dtype and tensors[k].shape == v.shape and torch.equal(tensors[k], v)
                      for k, v in expected.items())
        queue.put((rank, bool(ok)))
    finally:
        torch.distributed.destroy_process_group()




def test_two_gloo_processes_get_every_unit_bit_for_bit():
    assert spawn_and_collect(_worker, 2) == [(0, True), (1, True)]
