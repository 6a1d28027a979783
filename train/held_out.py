"""The held-out report every locally trained dictionary gets after its last step: one loop for SAEs
and meta-SAEs (which reconstruct their input) and transcoders (which predict another site).

A big store's held-out rows are spread over every block, so the report stops at
HELD_OUT_REPORT_ROWS rows (read in the store's seeded block order, so the sample spans the store)
instead of reading the whole held-out split again.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

HELD_OUT_REPORT_ROWS = 1 << 17


def capped(batches: Iterable[tuple], limit: int | None) -> Iterator[tuple]:
    """The first `limit` rows of batches of row-aligned arrays (None entries pass through); the
    batch that reaches the limit is the last one read. limit None: every batch."""
    if limit is None:
        yield from batches
        return
    left = limit
    for batch in batches:
        yield tuple(a if a is None else a[:left] for a in batch)
        left -= len(batch[0])
        if left <= 0:
            return


class HeldOutSums:
    """The running sums every held-out report is built from: per part (the one target of an SAE or
    transcoder, each site of a crosscoder, each target layer of a CLT) the squared error, the squared
    norm and the sum of the target rows (float64 with double_sums), for the variance around the mean;
    over the dictionary the L0, the latents that ever fired and the row count."""

    def __init__(self, parts, d_sae: int, device, double_sums: bool = False):
        self.err = {p: 0.0 for p in parts}
        self.norm2 = dict(self.err)
        self.row_sum: dict = {}
        self.double_sums = double_sums
        self.l0, self.count = 0.0, 0
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def add(self, part, out: torch.Tensor, target: torch.Tensor) -> None:
        self.err[part] += (out - target).pow(2).sum().item()
        self.norm2[part] += target.pow(2).sum().item()
        rows = target.double().sum(0) if self.double_sums else target.sum(0)
        self.row_sum[part] = rows if part not in self.row_sum else self.row_sum[part] + rows

    def add_latents(self, feats: torch.Tensor) -> None:
        self.l0 += (feats > 0).sum().item()
        self.fired |= (feats > 0).any(0)
        self.count += len(feats)

    def centred(self, part) -> float:
        """sum ||target - mean||^2 over the part's rows."""
        return self.norm2[part] - float(self.row_sum[part].pow(2).sum()) / self.count

    def dead_fraction(self) -> float:
        return 1 - self.fired.float().mean().item()


@torch.no_grad()
def held_out_report(sae, batches: Iterable[tuple], device) -> dict:
    """NMSE, explained variance, L0 and dead fraction of `sae` on batches of (x, g, y) in the
    training space, on the device: g the gradients a g-SAE selects with (else None), y the target a
    transcoder predicts (its skip path included; it also gets "fvu", 1 - explained variance), or
    None when the dictionary reconstructs x. {} when there are no rows."""
    sae.eval()
    sums, predicts = HeldOutSums([0], sae.cfg.d_sae, device), False
    for x, g, y in batches:
        feats = sae.encode(x, g)
        if y is None:
            sums.add(0, sae.decode(feats), x)
        else:
            sums.add(0, sae.decode(feats) + sae.skip_out(x), y)
            predicts = True
        sums.add_latents(feats)
    sae.train()
    if sums.count == 0:
        return {}
    err, total = sums.err[0], sums.centred(0)
    report = {"held_out_tokens": sums.count, "nmse": err / sums.norm2[0], "explained_variance": 1 - err / total}
    if predicts:
        report["fvu"] = err / total
    report.update(l0=sums.l0 / sums.count, dead_fraction=sums.dead_fraction())
    return report


def held_out_reconstruction(sae, batches, scale: float, device, limit: int | None = None) -> dict:
    """held_out_report of an SAE on raw (x, g) batches (CPU tensors): x divided and g multiplied by
    the input scale, as in training; at most `limit` rows."""
    def scaled():
        for x, g in capped(batches, limit):
            yield x.to(device) / scale, (g.to(device) * scale if g is not None else None), None
    return held_out_report(sae, scaled(), device)


def held_out_prediction(sae, store, site: str, target: str, scales: dict, batch_size: int, exclude_pos0: bool,
                        device) -> dict:
    """held_out_report of a transcoder from `site` to `target` on the rows of the store's held-out
    sequences (stores/split.py), both sites divided by their scales; at most HELD_OUT_REPORT_ROWS."""
    rows = ((b["acts"][site], b["acts"][target])
            for b in store.batches([site, target], batch_size, seqs="held_out", exclude_pos0=exclude_pos0,
                                   epochs=1, drop_last=False))

    def scaled():
        for x, y in capped(rows, HELD_OUT_REPORT_ROWS):
            yield (torch.from_numpy(x).to(device) / scales[site], None,
                   torch.from_numpy(y).to(device) / scales[target])
    return held_out_report(sae, scaled(), device)
