"""The held-out split of a store: whole sequences reserved for evaluation, a property of the store.

Rule: sequence s (its index in `tokens`, i.e. in corpus order) is held out iff s % every == 0.
Every `every`-th packed sequence is a systematic sample spread over the whole corpus and over
every shuffle window, each window holds about 1/every of its rows from held-out sequences, and
any reader in any language applies the rule to `rows/seq` without a list of ids. Trainers skip
every row of a held-out sequence (the local feed filters blocks by `rows/seq`, as it filters
position 0 by `rows/pos`; e2e never draws those sequences); evaluations and analyses use only
them. Sequence 0 is always held out, so every non-empty store has at least one held-out sequence.

`harvest run --eval-every N` records {"rule": "seq % every == 0", "every": N, "origin": "harvest"}
in attrs["sae_store"]["split"]. A store written before the split existed gets the same rule with
every = DEFAULT_EVERY, derived at read time (origin "derived"): SAEs trained on such a store by an
older version may have seen those sequences (they held out only the store's last rows).
docs/store-format.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import StoreError

DEFAULT_EVERY = 20      # 5% of the sequences
RULE = "seq % every == 0"
ORIGINS = {"harvest": "recorded by the harvest",
           "derived": "derived at read time (the store predates the split: SAEs trained on it by an older "
                      "version may have trained on these sequences)"}


@dataclass(frozen=True)
class Split:
    every: int
    origin: str          # "harvest" or "derived"

    def is_held_out(self, seqs) -> np.ndarray:
        """Boolean mask over sequence ids: True where the sequence is held out."""
        return np.asarray(seqs, dtype=np.int64) % self.every == 0

    def held_out_seqs(self, n_seqs: int) -> np.ndarray:
        return np.arange(0, n_seqs, self.every, dtype=np.int64)

    def train_seqs(self, n_seqs: int) -> np.ndarray:
        seqs = np.arange(n_seqs, dtype=np.int64)
        return seqs[~self.is_held_out(seqs)]

    def n_held_out(self, n_seqs: int) -> int:
        return -(-n_seqs // self.every)

    def to_attrs(self) -> dict:
        return {"rule": RULE, "every": self.every, "origin": self.origin}

    def describe(self, n_seqs: int, ctx_len: int) -> str:
        n = self.n_held_out(n_seqs)
        return (f"{n:,} held-out sequences ({n * ctx_len:,} tokens) of {n_seqs:,}: every {self.every}th "
                f"(seq % {self.every} == 0), {ORIGINS[self.origin]}")


def split_attrs(every: int) -> dict:
    """What the harvest records in attrs["sae_store"]["split"]."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 2:
        raise StoreError(f"--eval-every {every!r}: must be an integer >= 2 (every N-th sequence held out)")
    return Split(every, "harvest").to_attrs()


def store_split(attrs: dict, path: str = "store") -> Split:
    """The split of a store from its root attributes; an older store's is derived (DEFAULT_EVERY)."""
    split = attrs.get("split")
    if split is None:
        return Split(DEFAULT_EVERY, "derived")
    every = split.get("every") if isinstance(split, dict) else None
    if not isinstance(split, dict) or split.get("rule") != RULE or not isinstance(every, int) \
            or isinstance(every, bool) or every < 2:
        raise StoreError(f"{path}: root attribute split = {split!r} is not a split this tool reads "
                         f"(rule {RULE!r}, every >= 2)")
    return Split(every, "harvest")


def same_held_out(a, b, sequences: int | None = None, chunk: int = 4096) -> bool:
    """Whether open stores a and b hold out the same sequences: the same rule, and b's first
    `sequences` held-out sequences (all of them when None) are a's, index by index and token by
    token. Two harvests of one corpus with one split (e.g. the labels and the label-free gradient
    store) pass; an SAE trained on a, which skipped a's held-out sequences, then never saw b's
    evaluated ones. Read in chunks of sequences: memory follows `chunk`, not the store."""
    if a.split.every != b.split.every or a.ctx_len != b.ctx_len:
        return False
    held = b.split.held_out_seqs(b.n_seqs)
    held = held if sequences is None else held[:sequences]
    if len(held) and held[-1] >= a.n_seqs:
        return False
    for i in range(0, len(held), chunk):
        idx = held[i:i + chunk]
        if not np.array_equal(np.asarray(a.tokens.get_orthogonal_selection((idx, slice(None)))),
                              np.asarray(b.tokens.get_orthogonal_selection((idx, slice(None))))):
            return False
    return True
