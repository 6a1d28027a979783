"""The helpers that replaced three copies each (issue 17): keep_clean_positions (the splice keeps
position 0 clean) and unit_rows (decoder directions), against hand-built tensors."""
import torch

from sae_harvest.harvest.sites import keep_clean_positions
from sae_harvest.train.sae import unit_rows


def test_keep_clean_positions_full_and_tail_outputs():
    a = torch.arange(2 * 4 * 3, dtype=torch.float16).view(2, 4, 3)
    full = -torch.ones(2, 4, 3, dtype=torch.float32)
    out = keep_clean_positions(a, full)
    assert out.dtype == torch.float16
    assert torch.equal(out[:, 0], a[:, 0]) and torch.equal(out[:, 1:], full[:, 1:].half())
    tail = -2 * torch.ones(2, 3, 3)                   # only positions >= 1, as e2e and stitch give it
    assert torch.equal(keep_clean_positions(a, tail), torch.cat([a[:, :1], tail.half()], 1))
    assert torch.equal(keep_clean_positions(a, full, first=0), full.half())   # --splice-bos / --include-bos
    two = keep_clean_positions(a, -3 * torch.ones(2, 2, 3), first=2)
    assert torch.equal(two[:, :2], a[:, :2]) and (two[:, 2:] == -3).all()


def test_unit_rows():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], requires_grad=True)
    u = unit_rows(w)
    assert not u.requires_grad and u.dtype == torch.float32
    assert torch.equal(u, torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]))
