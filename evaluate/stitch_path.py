"""The stitching path of `evaluate stitch` (evaluate/stitch.py has the criterion and the command):
Leask, Bussmann et al. 2024, "Sparse autoencoders do not find canonical units of analysis", eq. 5
walked one latent or one swap group at a time, each step's MSE updated incrementally (a latent
touches only the tokens it fires on) instead of re-decoding every token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# --- the path ----------------------------------------------------------------------------------
class Columns:
    """The latents of an SAE on tokens x, stored per latent (CSR): the tokens it fires on and its
    values, so adding or removing one latent touches only those tokens."""

    def __init__(self, sae, x: torch.Tensor):
        chunk = max(256, (1 << 22) // sae.cfg.d_sae)   # dense latents of one chunk: ~16 MB
        toks, lats, vals = [], [], []
        with torch.no_grad():
            for lo in range(0, len(x), chunk):
                f = sae.encode(x[lo:lo + chunk].to(sae.W_dec.dtype))
                nz = f.nonzero()
                toks.append(nz[:, 0] + lo), lats.append(nz[:, 1]), vals.append(f[nz[:, 0], nz[:, 1]])
        lat = torch.cat(lats)
        order = torch.sort(lat, stable=True).indices
        self.tok = torch.cat(toks)[order]
        self.val = torch.cat(vals)[order].double()
        counts = torch.bincount(lat, minlength=sae.cfg.d_sae)
        self.fires = counts.cpu()
        self.ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        self.dec = sae.W_dec.detach().double()
        self.b_dec = sae.b_dec.detach().double()

    def delta(self, i: int):
        """(tokens, contribution [n, d]) of latent i."""
        lo, hi = self.ptr[i], self.ptr[i + 1]
        return self.tok[lo:hi], self.val[lo:hi, None] * self.dec[i]


class Residual:
    """x - x_hat without the bias term (r) and its running sums, so that the squared error for any
    bias c, sum_t ||r_t - c||^2 = q - 2 c.s + n ||c||^2, costs O(d) and a latent O(its tokens x d)."""

    def __init__(self, x: torch.Tensor, decoded: torch.Tensor):
        self.r = x.double() - decoded.double()
        self.q = self.r.pow(2).sum()
        self.s = self.r.sum(0)
        self.n = len(x)

    def error(self, c: torch.Tensor, dq=0.0, ds=0.0) -> float:
        q, s = self.q + dq, self.s + ds
        return float(q - 2 * (c @ s) + self.n * (c @ c))

    def change(self, tok, contribution, sign: float):
        """(dq, ds, new rows) if `sign` * contribution is added to x_hat on tokens `tok`."""
        old = self.r[tok]
        new = old - sign * contribution
        return new.pow(2).sum() - old.pow(2).sum(), -sign * contribution.sum(0), new

    def apply(self, tok, contribution, sign: float) -> None:
        dq, ds, new = self.change(tok, contribution, sign)
        self.q, self.s = self.q + dq, self.s + ds
        self.r[tok] = new


@dataclass
class Snapshot:
    """Which latents of each SAE a point of the path uses; reconstruct() is eq. 5."""
    small: torch.Tensor   # bool [F0]
    large: torch.Tensor   # bool [F1]

    def reconstruct(self, small_sae, large_sae, x: torch.Tensor) -> torch.Tensor:
        n0, n1 = int(self.small.sum()), int(self.large.sum())
        alpha = n0 / (n0 + n1)
        x = x.to(small_sae.W_dec.dtype)
        f0 = small_sae.encode(x) * self.small.to(x.device)
        f1 = large_sae.encode(x) * self.large.to(x.device)
        return f0 @ small_sae.W_dec + f1 @ large_sae.W_dec + alpha * small_sae.b_dec + (1 - alpha) * large_sae.b_dec


def stitch_path(small, large, x: torch.Tensor, novel, groups, orphans, snapshot_steps=(), live_small=None,
                columns=None):
    """Walk the path on tokens x [n, d]; ([one dict per step], {step: Snapshot}, independent dMSE).

    "mse" is the squared error summed over d, mean over tokens (the training loss's term); the
    independent dMSE of a large latent is the MSE change when it alone is added to the small SAE
    (the paper's fig. 4). `live_small` (bool [F0]): the small latents the path starts with (default
    all); `columns`: the two SAEs' Columns on x, if already built."""
    c0, c1 = columns or (Columns(small, x), Columns(large, x))
    n, f1 = len(x), large.cfg.d_sae
    in0 = torch.ones(small.cfg.d_sae, dtype=torch.bool) if live_small is None else live_small.clone()
    f0 = int(in0.sum())
    with torch.no_grad():
        decoded = torch.cat([small.decode(small.encode(p.to(small.W_dec.dtype))) - small.b_dec
                             for p in x.split(4096)])
    res = Residual(x, decoded)
    for j in (~in0).nonzero().flatten().tolist():   # left out of the start (a dead one changes nothing)
        res.apply(*c0.delta(j), -1)
    norm2 = float(x.double().pow(2).sum())
    in1 = torch.zeros(f1, dtype=torch.bool)
    fires0, fires1 = c0.fires.double(), c1.fires.double()

    def bias(k0, k1):
        a = k0 / (k0 + k1)
        return a * c0.b_dec + (1 - a) * c1.b_dec

    start_err = res.error(bias(f0, 0))
    independent = []
    for i in range(f1):
        tok, contrib = c1.delta(i)
        dq, ds, _ = res.change(tok, contrib, +1)
        independent.append((res.error(bias(f0, 1), dq, ds) - start_err) / n)

    steps, snaps = [], {}
    snapshot_steps = set(snapshot_steps)

    def record(phase, added, removed):
        k0, k1 = int(in0.sum()), int(in1.sum())
        err = res.error(bias(k0, k1))
        steps.append({"step": len(steps), "phase": phase, "added": added, "removed": removed,
                      "n_small": k0, "n_large": k1, "latents": k0 + k1,
                      "l0": float(fires0[in0].sum() + fires1[in1].sum()) / n,
                      "mse": err / n, "nmse": err / norm2 if norm2 else None,
                      "ce_increase": None, "kl": None})
        if steps[-1]["step"] in snapshot_steps:
            snaps[steps[-1]["step"]] = Snapshot(in0.clone(), in1.clone())

    def add(i):
        res.apply(*c1.delta(i), +1)
        in1[i] = True

    def remove(j):
        res.apply(*c0.delta(j), -1)
        in0[j] = False

    record("start", [], [])
    for i in novel:
        add(i)
        record("novel", [i], [])
    for small_ids, large_ids in groups:
        for j in small_ids:
            remove(j)
        for i in large_ids:
            add(i)
        record("swap", large_ids, small_ids)
    for j in orphans:
        remove(j)
        record("drop", [], [j])
    return steps, snaps, independent


def path_length(novel, groups, orphans) -> int:
    return 1 + len(novel) + len(groups) + len(orphans)


def ce_steps(novel, groups, orphans, points: int) -> list[int]:
    """`points` evenly spaced steps, always with both ends and the end of the novel phase."""
    last = path_length(novel, groups, orphans) - 1
    if points <= 0:
        return []
    picked = {0, last, len(novel)}
    if points > 1:
        picked |= {round(k * last / (points - 1)) for k in range(points)}
    return sorted(picked)
