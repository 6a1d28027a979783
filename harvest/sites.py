"""Sites: where activations are read (capture, record) and replaced (splice).

A site is "blocks.{layer}.{kind}". Definitions, for zero-indexed block L (see docs/sites.md):
  resid_pre  block input (= HF hidden_states[L])
  attn_in    the attention module's input, after its pre-norm (GPT-2 ln_1(resid_pre))
  attn_out   exactly what attention adds to the residual stream (Gemma 2/3: after its post-norm)
  resid_mid  resid_pre + attn_out
  mlp_in     the MLP module's input, after its pre-norm (GPT-2 ln_2(resid_mid))
  mlp_out    exactly what the MLP adds to the residual stream (Gemma 2/3: after its post-norm)
  resid_post block output (= resid_pre of L+1)
  attn_z     concatenated per-head attention outputs, the input of the output projection
  mlp_act    MLP hidden activation, the input of the MLP output projection (Gemma: act(gate)*up)
Which module each is read from is family knowledge and lives in one table, SITE_KINDS in
harvest/models.py.
"""

from __future__ import annotations

import fnmatch
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_harvest.harvest.errors import HarvestError
from sae_harvest.harvest.models import KINDS, get_adapter   # KINDS: forward order; Site sorts by it

_NAME = re.compile(r"^blocks\.(\d+)\.([A-Za-z_]+)$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    _rank: int = field(init=False, repr=False)  # forward order of the kind, for sorting only
    kind: str = ""

    def __init__(self, layer: int, kind: str):
        if kind not in KINDS:
            raise HarvestError(f"unknown site kind '{kind}'; kinds: {', '.join(KINDS)}")
        object.__setattr__(self, "layer", int(layer))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "_rank", KINDS.index(kind))

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "Site":
        match = _NAME.match(name.strip())
        if not match:
            raise HarvestError(f"malformed site name '{name}'; expected blocks.<layer>.<kind>, "
                               f"e.g. blocks.6.resid_pre")
        return cls(int(match.group(1)), match.group(2))


def parse_sites(spec: str, n_layers: int) -> list[Site]:
    """Comma list of site names and fnmatch globs -> sorted, de-duplicated sites."""
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise HarvestError("no sites given; e.g. --sites blocks.6.resid_pre")
    all_names = [Site(layer, kind).name for layer in range(n_layers) for kind in KINDS]
    found: set[Site] = set()
    for item in items:
        if any(ch in item for ch in "*?["):
            matched = fnmatch.filter(all_names, item)
            if not matched:
                raise HarvestError(f"site pattern '{item}' matches no site (the model has "
                                   f"{n_layers} layers; kinds: {', '.join(KINDS)})")
            found.update(Site.parse(name) for name in matched)
        else:
            site = Site.parse(item)
            _check_layer(site, n_layers)
            found.add(site)
    return sorted(found)


def _check_layer(site: Site, n_layers: int) -> None:
    if not 0 <= site.layer < n_layers:
        raise HarvestError(f"layer {site.layer} out of range in '{site.name}': the model has "
                           f"{n_layers} layers (0-{n_layers - 1})")


def _as_sites(sites, n_layers: int) -> list[Site]:
    # A single site (or name) is accepted too; a bare string would otherwise iterate by char.
    if isinstance(sites, (str, Site)):
        sites = [sites]
    return sorted({_as_site(s, n_layers) for s in sites})


def _as_site(site, n_layers: int) -> Site:
    site = site if isinstance(site, Site) else Site.parse(str(site))
    _check_layer(site, n_layers)
    return site


# --- hooks -------------------------------------------------------------------------------------
# A site function gets the activation and returns a replacement tensor, or None to leave it be.
SiteFn = Callable[[Tensor], "Tensor | None"]


def _hook(module, where: str, fn: SiteFn, prepend: bool):
    if where == "input":
        def pre_hook(_mod, args, kwargs):
            # Decoder layers get hidden_states positionally in HF today; accept the kwarg too.
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    def post_hook(_mod, _args, output):
        # Attention modules return (out, weights); everything else returns a tensor.
        is_tuple = isinstance(output, tuple)
        new = fn(output[0] if is_tuple else output)
        if new is None:
            return None
        return (new, *output[1:]) if is_tuple else new
    return module.register_forward_hook(post_hook, prepend=prepend)


def _site_hooks(adapter, site: Site, fn: SiteFn, prepend: bool = False) -> list:
    """Install fn at site; returns the hook handles. Splices pass prepend=True so that they run
    before any observer on the same module: observers then see what the downstream layers see."""
    if site.kind != "resid_mid":
        module, where = adapter.hook_point(site.layer, site.kind)
        return [_hook(module, where, fn, prepend)]

    # replacing attn_out by fn(mid) - resid_pre makes the block's residual sum equal fn(mid)
    def on_mid(pre, a):
        new = fn(pre + a)
        return None if new is None else new - pre
    return _mid_hooks(adapter, site.layer, on_mid, prepend)


def _mid_hooks(adapter, layer: int, on_mid, prepend: bool) -> list:
    """resid_mid is no module's output: the block computes resid_pre + attn_out internally. Keep
    resid_pre from the block input and call on_mid(resid_pre, attn_out) at attn_out; what it returns
    (None: unchanged) replaces attn_out. The one place resid_mid is built (splice, record, capture)."""
    block, _ = adapter.hook_point(layer, "resid_pre")
    attn, where = adapter.hook_point(layer, "attn_out")
    state = {}

    def keep_pre(x):
        state["pre"] = x

    # The observer is appended so it sees the block input after any resid_pre splice.
    return [_hook(block, "input", keep_pre, prepend=False),
            _hook(attn, where, lambda a: on_mid(state["pre"], a), prepend)]


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()


@contextmanager
def splice(model, site, fn: Callable[[Tensor], Tensor]):
    """While active, the site's activation a is replaced by fn(a) for everything downstream.
    Differentiable through fn (and through the model, whose weights stay frozen)."""
    adapter = get_adapter(model)
    site = _as_site(site, adapter.n_layers)
    handles = _site_hooks(adapter, site, fn, prepend=True)
    try:
        yield
    finally:
        _remove(handles)


@contextmanager
def record(model, sites: Iterable):
    """Yields a dict filled with {site name: activation} (not detached) on every forward pass;
    with a splice active, values are the spliced ones downstream layers see."""
    adapter = get_adapter(model)
    out: dict[str, Tensor] = {}
    handles = []
    try:
        for site in _as_sites(sites, adapter.n_layers):
            handles += _site_hooks(adapter, site, _store_into(out, site.name))
        yield out
    finally:
        _remove(handles)


def _store_into(out: dict, name: str) -> SiteFn:
    def store(a):
        out[name] = a
    return store


# --- capture -----------------------------------------------------------------------------------
@dataclass
class Captured:
    acts: dict[str, Tensor]                 # site name -> [B, T, width], detached
    grads: dict[str, Tensor] | None = None  # d(summed next-token CE)/d act, same shapes
    loss_sum: Tensor | None = None          # scalar float32: CE summed over B x (T-1) predictions


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured, to skip the later layers."""


def next_token_loss_sum(logits: Tensor, input_ids: Tensor) -> Tensor:
    """CE summed over positions 0..T-2 predicting tokens 1..T-1, computed in float32."""
    pred = logits[:, :-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), input_ids[:, 1:].reshape(-1),
                           reduction="sum")


def capture(model, input_ids: Tensor, sites: Iterable, *, grads: bool = False,
            stop_early: bool = True) -> Captured:
    """Activations at `sites` from one forward pass; with grads, the gradient of the summed
    next-token CE w.r.t. each of them from one backward pass (the last position's is 0)."""
    adapter = get_adapter(model)
    sites = _as_sites(sites, adapter.n_layers)
    if not sites:
        raise HarvestError("no sites to capture")
    acts: dict[str, Tensor] = {}
    grad_of: dict[str, Tensor] = {}  # tensor in the live graph whose gradient is the site's
    stop = stop_early and not grads
    handles = []

    def tap(a: Tensor) -> Tensor:
        # Weights are frozen, so nothing upstream of the first site requires grad. Make the
        # activation a leaf there (same values, nothing upstream is lost); later sites are
        # then ordinary graph nodes that autograd.grad can differentiate to.
        return a.detach().requires_grad_(True) if grads and not a.requires_grad else a

    def done() -> None:
        if stop and len(acts) == len(sites):
            raise _StopForward

    def make_hook(name: str) -> SiteFn:
        def hook(a):
            live = tap(a)
            acts[name] = grad_of[name] = live
            done()
            return live if live is not a else None
        return hook

    def make_mid_hook(name: str):
        # resid_mid = resid_pre + attn_out feeds everything downstream only through that sum,
        # so d loss/d resid_mid == d loss/d attn_out: take the gradient at attn_out rather than
        # rebuild the sum, which would change the forward pass by rounding.
        def on_mid(pre, a):
            live = tap(a)
            acts[name] = pre + live
            grad_of[name] = live
            done()
            return live if live is not a else None
        return on_mid

    try:
        for site in sites:
            if site.kind == "resid_mid":
                handles += _mid_hooks(adapter, site.layer, make_mid_hook(site.name), prepend=False)
            else:
                module, where = adapter.hook_point(site.layer, site.kind)
                handles.append(_hook(module, where, make_hook(site.name), False))
        return _run(model, input_ids, sites, acts, grad_of, grads, stop)
    finally:
        _remove(handles)


def _run(model, input_ids, sites, acts, grad_of, grads, stop) -> Captured:
    loss = None
    with torch.enable_grad() if grads else torch.no_grad():
        try:
            logits = model(input_ids=input_ids, use_cache=False).logits
            loss = next_token_loss_sum(logits, input_ids)
        except _StopForward:
            pass
        names = [s.name for s in sites]
        missing = [n for n in names if n not in acts]
        if missing:
            raise RuntimeError(f"sites never fired during the forward pass: {missing}")
        result = None
        if grads:
            got = torch.autograd.grad(loss, [grad_of[n] for n in names], allow_unused=True)
            result = {n: torch.zeros_like(grad_of[n]) if g is None else g
                      for n, g in zip(names, got)}
    return Captured(acts={n: acts[n].detach() for n in names}, grads=result,
                    loss_sum=None if loss is None else loss.detach())


def downstream_sites(site: Site, n_layers: int) -> list[str]:
    """The residual streams downstream of `site` that e2e+ds trains on and `evaluate splice` scores:
    the stream entering each later block, i.e. resid_post of blocks first..n_layers-2 (resid_post of
    the site's own block is downstream of every kind but resid_post itself). The range is the e2e
    paper's ("Identifying Functionally Important Features with End-to-End Sparse Dictionary
    Learning", eq. 1: a^(k) for k = l+1 .. L-1, the input of each later block; e2e_sae lists
    blocks.7..11.hook_resid_pre for an SAE at blocks.6.hook_resid_pre). The last block's output is
    left out: only the final norm and the unembedding read it, and the KL and CE measure exactly
    their result."""
    first = site.layer + 1 if site.kind == "resid_post" else site.layer
    return [f"blocks.{k}.resid_post" for k in range(first, n_layers - 1)]


def keep_clean_positions(a: Tensor, out: Tensor, first: int = 1) -> Tensor:
    """A splice's result with the clean activation `a` [B, T, d] kept at positions < first and
    `out` after it; `out` is either [B, T, d] (its first positions are dropped) or just the
    positions from `first` on, [B, T - first, d]. SAEs are trained without position 0, GPT-2's
    attention sink (norm in the thousands), so `evaluate`, the analyses and e2e training keep it
    clean unless told otherwise (first=0)."""
    if first == 0:
        return out.to(a.dtype)
    tail = out if out.shape[1] == a.shape[1] - first else out[:, first:]
    return torch.cat([a[:, :first], tail.to(a.dtype)], 1)
