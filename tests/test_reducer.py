"""The batch-wide reductions reach the losses and the optimizer step as an argument (issue 17): two
ranks simulated by two threads, each with its half of a batch and a Reducer that exchanges through
shared memory, must give what one process gives on the whole batch. A loss that ignored the reducer
it is handed would take BatchTopK's cutoff and AuxK's variance from its own half and differ.
And train/distributed.py keeps no module-level state a step could read instead."""
import ast
import copy
import dataclasses
import inspect
import threading

import pytest
import torch

from sae_harvest.train import distributed
from sae_harvest.train.registry import SAEConfig, make_sae
from sae_harvest.train.runs import Run, make_adam, optimizer_step
from sae_harvest.train.stacked import StackedSAEs, stacked_step


class _Exchange:
    def __init__(self, ranks: int):
        self.barrier, self.slots = threading.Barrier(ranks, timeout=60), [None] * ranks


@dataclasses.dataclass(frozen=True)
class ThreadReducer(distributed.Reducer):
    """One of `ranks` threads' reducer: every collective of Reducer, through shared slots, in rank
    order (as gloo sums); records which reductions it was asked for."""
    active: bool = True
    rank: int = 0
    size: int = 2
    ex: _Exchange = None
    calls: list = dataclasses.field(default_factory=list)

    def _all(self, t):
        self.ex.slots[self.rank] = t.detach().clone()
        self.ex.barrier.wait()
        parts = list(self.ex.slots)
        self.ex.barrier.wait()   # nobody overwrites a slot before every rank has read them
        return parts

    def ranks(self):
        return self.size

    def all_sum(self, t):
        self.calls.append("all_sum")
        parts = self._all(t)
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return t.copy_(total)

    def global_min(self, t):
        self.calls.append("global_min")
        parts = self._all(t)
        return t.copy_(torch.stack(parts).amin(0))

    def all_gather(self, t, dim=0):
        self.calls.append("all_gather")
        return torch.cat(self._all(t), dim)

    def any_rank(self, mask):
        self.calls.append("any_rank")
        return torch.stack(self._all(mask)).any(0)

    def global_mean(self, values):
        self.calls.append("global_mean")
        keys = list(values)
        parts = self._all(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.size for k, v in zip(keys, sum(parts).tolist())}

    def average_gradients(self, module):
        self.calls.append("average_gradients")
        for p in module.parameters():
            if p.grad is not None:
                p.grad.copy_(sum(self._all(p.grad)) / self.size)


def _on_two_ranks(fn, *args_per_rank):
    """fn(reducer, *args) on two threads (rank r gets args_per_rank[i][r]); returns [(result, calls)]."""
    ex, out, errors = _Exchange(2), [None, None], []

    def body(r):
        red = ThreadReducer(rank=r, ex=ex)
        try:
            out[r] = fn(red, *[a[r] for a in args_per_rank]), red.calls
        except BaseException as e:   # noqa: BLE001  (re-raised below, on the test's thread)
            errors.append(e)
            ex.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _saes(arch, ks, d_in=12, d_sae=48):
    saes = []
    for k in ks:
        torch.manual_seed(int(k))
        sae = make_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k, aux_k=8, aux_coeff=0.5))
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.2)
        saes.append(sae.train())
    return saes


def _batch(n=32, d_in=12):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, d_in, generator=g) * torch.rand(n, 1, generator=g) * 3


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
def test_stacked_loss_reduces_through_the_reducer_it_is_handed(arch):
    saes = _saes(arch, (2, 5))
    x = _batch()
    dead = torch.rand(2, 48, generator=torch.Generator().manual_seed(4)) < 0.5   # AuxK on
    whole = StackedSAEs(copy.deepcopy(saes))
    loss, per, terms, fired, x_hat = whole.loss(x, dead)   # one process: LOCAL
    halves = x[:16], x[16:]
    stacks = StackedSAEs(copy.deepcopy(saes)), StackedSAEs(copy.deepcopy(saes))
    got = _on_two_ranks(lambda red, st, xr: st.loss(xr, dead, red), stacks, halves)
    (_, per0, terms0, fired0, x_hat0), calls0 = got[0]
    (_, per1, terms1, fired1, x_hat1), _ = got[1]
    # each rank's loss is its share's mean (AuxK over the global variance, times the ranks): their mean is the batch's
    torch.testing.assert_close((per0 + per1) / 2, per, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((terms0["aux"] + terms1["aux"]) / 2, terms["aux"], rtol=1e-5, atol=1e-6)
    assert float(terms["aux"].min()) > 0
    torch.testing.assert_close(torch.cat([x_hat0, x_hat1], 1), x_hat, rtol=1e-5, atol=1e-6)
    assert torch.equal(fired0 | fired1, fired)
    assert calls0.count("all_sum") >= 2   # AuxK's mean and variance
    if arch == "batchtopk":   # the batch-wide cutoff and the threshold EMA's least kept value
        assert {"all_gather", "global_min"} <= set(calls0)
        for st in stacks:
            torch.testing.assert_close(st.threshold, whole.threshold)
    # the control: each half reduced only over itself (LOCAL) does differ, so the match above is the reducer's
    alone = [StackedSAEs(copy.deepcopy(saes)).loss(h, dead) for h in halves]
    assert not torch.allclose((alone[0][2]["aux"] + alone[1][2]["aux"]) / 2, terms["aux"], rtol=1e-3)
    if arch == "batchtopk":
        assert not torch.allclose(torch.cat([alone[0][4], alone[1][4]], 1), x_hat, rtol=1e-3)


def test_stacked_step_and_optimizer_step_take_the_reducer_they_are_handed():
    """One training step on two simulated ranks equals one step on the whole batch, for the stack
    (stacked_step) and for one SAE (its loss + optimizer_step: gradients averaged, fired OR-ed)."""
    saes, x, lr = _saes("batchtopk", (3,)), _batch(), 1e-2
    dead_after = 1

    def one_sae_step(red, sae, xr):
        run = Run(name="a", sae=sae, opt=make_adam(sae.parameters(), lr, sae.adam_betas), lr=lr,
                  since_fired=torch.zeros(48, dtype=torch.long))
        run.since_fired[::3] = 5   # some latents dead: AuxK runs
        out = sae.loss(xr, dead_mask=run.since_fired >= dead_after, reducer=red)
        out.loss.backward()
        optimizer_step(run, 1.0, 1.0, fired=(out.feats > 0).any(0), tokens=len(xr) * red.ranks(), reducer=red)
        return sae, run.since_fired

    local, since = one_sae_step(distributed.LOCAL, copy.deepcopy(saes[0]), x)
    got = _on_two_ranks(one_sae_step, [copy.deepcopy(saes[0]) for _ in range(2)], (x[:16], x[16:]))
    assert {"average_gradients", "any_rank", "all_gather", "global_min"} <= set(got[0][1])
    for (sae, since_r), _ in got:
        assert torch.equal(since_r, since)
        for name, p in local.named_parameters():
            torch.testing.assert_close(getattr(sae, name), p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.threshold, local.threshold)

    def stack_step(red, stack, xr):
        opt = make_adam(stack.parameters(), lr, saes[0].adam_betas)
        since = torch.zeros(1, 48, dtype=torch.long)
        since[:, ::3] = 5
        stacked_step(stack, opt, xr, since, dead_after, 5, lr, 1.0, red)
        return stack, since

    whole, since = stack_step(distributed.LOCAL, StackedSAEs(copy.deepcopy(saes)), x)
    got = _on_two_ranks(stack_step, [StackedSAEs(copy.deepcopy(saes)) for _ in range(2)], (x[:16], x[16:]))
    assert {"average_gradients", "any_rank", "all_gather", "global_min", "all_sum"} <= set(got[0][1])
    for (stack, since_r), _ in got:
        assert torch.equal(since_r, since)
        for name in whole.names + whole.buffer_names:
            torch.testing.assert_close(getattr(stack, name), getattr(whole, name), rtol=1e-5, atol=1e-6)


def test_distributed_keeps_no_module_level_mutable_state():
    """Nothing in train/distributed.py a step could read instead of its argument: no `global`
    statement, no module-level name bound to anything mutable, LOCAL frozen."""
    tree = ast.parse(inspect.getsource(distributed))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))]
    immutable = (int, float, str, bool, bytes, tuple, frozenset, type(None), type(distributed.RESULTS_WAIT))
    assigned = [t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
    assert "LOCAL" in assigned
    for name in assigned:   # what the module binds at import: constants and frozen dataclasses only
        value = getattr(distributed, name)
        if dataclasses.is_dataclass(value):
            assert type(value).__dataclass_params__.frozen, name
        else:
            assert isinstance(value, immutable), f"distributed.{name} is a {type(value).__name__}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        distributed.LOCAL.active = True
    for gone in ("current", "_current", "ranks", "all_sum", "global_min", "any_rank", "global_mean",
                 "average_gradients"):
        assert not hasattr(distributed, gone), gone
    with distributed.data_parallel() as reducer:   # no process group: the step's reducer is LOCAL
        assert reducer is distributed.LOCAL


def test_stacked_batch_cutoff_when_the_global_k_passes_one_ranks_entries():
    """n ranks k > n d (k near d_sae, several ranks): each rank's offer is capped at its n d entries,
    and the gathered offers were cut back to one rank's length, so the cutoff's index ran past it
    (IndexError). The cutoff must be the one-process cutoff over the whole batch."""
    from sae_harvest.train.stacked_losses import batch_thresholds

    g = torch.Generator().manual_seed(5)
    pre = torch.rand(2, 8, 6, generator=g)      # [S, n_global, d]
    ks = torch.tensor([3, 6])
    whole = batch_thresholds(pre, ks, 6)
    halves = _on_two_ranks(lambda red, p: batch_thresholds(p, ks, 6, red), [pre[:, :4], pre[:, 4:]])
    for cut, calls in halves:
        assert torch.equal(cut, whole) and "all_gather" in calls
