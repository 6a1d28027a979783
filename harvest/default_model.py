"""The offline default model: a tiny GPT-2 trained on the Python standard library.

Demos, benchmarks and tests need a *real* trained language model, but must run
without network access, so nothing can come from the HF hub. Every machine that
runs this project has a Python standard library, so we use its ``.py`` sources
as the corpus, train a byte-level BPE tokenizer and a 4-layer GPT-2 on it (about
two minutes on two CPU cores), and cache the result as an ordinary HF model
directory. After that, ``--model stdlib-gpt2`` is just another local checkpoint.

    OFFLINE_MODEL   -> cache_root()/stdlib-gpt2-v1/       (built on first use)
    OFFLINE_DATASET -> cache_root()/stdlib-py-v1.jsonl    (one {"text": ...} per file)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import platform
import shutil
import sysconfig
import tempfile
import time

from sae_harvest.stores.artifacts import artifact_json

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, builds just are not serialised
    fcntl = None

OFFLINE_MODEL = "stdlib-gpt2"
OFFLINE_DATASET = "stdlib-py"
MODEL_VERSION = "stdlib-gpt2-v1"  # bump when anything below changes the weights
CORPUS_VERSION = "stdlib-py-v1"
EOT = "<|endoftext|>"

# corpus
MAX_CORPUS_BYTES = 24_000_000  # a typical stdlib is ~11 MB without tests, so this rarely bites
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}
VAL_EVERY = 20  # every 20th file is held out: ~5%, spread across the whole stdlib
VAL_MAX_TOKENS = 131_072  # bounds evaluation time; plenty for a stable estimate

# model / training; STEPS is calibrated so the whole build takes ~2 min on 2 CPU cores
VOCAB_SIZE = 4096
N_LAYER, N_HEAD, N_EMBD, N_POSITIONS = 4, 4, 128, 256
BLOCK_SIZE = 128  # shorter than n_positions: cheaper, and long enough for code
BATCH_SIZE = 16
STEPS = 500
LR, MIN_LR = 3e-3, 3e-4  # a model this small tolerates a high peak rate
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SAE_HARVEST_CACHE") or "~/.cache/sae-harvest").expanduser()


@contextlib.contextmanager
def _locked(name: str):
    # flock, not a lock-file-exists check: the kernel drops it if the holder dies
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _publish(tmp, final, mode: int):
    # mkstemp/mkdtemp create owner-only entries; a cache should honour the umask like any file
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, mode & ~umask)
    os.replace(tmp, final)  # atomic: readers see nothing or the whole thing, never a partial build


def stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    # sort on the relative path so the order is the same wherever Python is installed
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_texts(max_bytes: int = MAX_CORPUS_BYTES) -> list[str]:
    """Contents of the stdlib sources, in sorted order, up to max_bytes (a prefix)."""
    texts, total = [], 0
    for p in stdlib_files():
        # sources are UTF-8 (PEP 3120); replacing a stray bad byte beats failing the build
        text = p.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            continue  # empty __init__.py files would only add separators
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        texts.append(text)
        total += size
    return texts


def default_corpus_path(build: bool = True) -> pathlib.Path:
    """Local JSONL of the default corpus; built if absent (unless build=False)."""
    path = cache_root() / f"{CORPUS_VERSION}.jsonl"
    if path.exists() or not build:
        return path
    with _locked(CORPUS_VERSION):
        if not path.exists():  # another process may have built it while we waited
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    for text in stdlib_texts():
                        f.write(json.dumps({"text": text}) + "\n")
                _publish(tmp, path, 0o666)
            except BaseException:
                os.unlink(tmp)
                raise
    return path


def default_model_dir(build: bool = True, progress: bool = True) -> pathlib.Path:
    """HF model directory of the default model; built and cached on first call.

    With build=False the path is returned whether or not it exists yet.
    """
    final = cache_root() / MODEL_VERSION
    if (final / "build_report.json").exists() or not build:
        return final
    with _locked(MODEL_VERSION):
        if not (final / "build_report.json").exists():
            if final.exists():  # not made by us (we only ever rename whole builds in)
                shutil.rmtree(final)
            tmp = pathlib.Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{MODEL_VERSION}.tmp-"))
            try:
                build_default_model(tmp, progress=progress)
                _publish(tmp, final, 0o777)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(name: str) -> str:
    return str(default_model_dir()) if name == OFFLINE_MODEL else name


def resolve_dataset(name: str) -> str:
    return str(default_corpus_path()) if name == OFFLINE_DATASET else name


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
        model_max_length=N_POSITIONS,
        clean_up_tokenization_spaces=False,  # the clean-up would rewrite code like "x ." on decode
    )


def _pack(tokenizer, texts: list[str]):
    import torch

    # a separator before each document, GPT-2 style, so every document starts after <|endoftext|>
    eot = tokenizer.convert_tokens_to_ids(EOT)
    encs = tokenizer.backend_tokenizer.encode_batch(texts)
    return torch.tensor([i for enc in encs for i in (eot, *enc.ids)], dtype=torch.long)


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tps]:>7,.0f} tok/s"), TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout stays clean for scripts that print the path
    )


def build_default_model(out_dir, *, seed: int = 0, progress: bool = True,
                        steps: int | None = None, max_corpus_bytes: int | None = None) -> dict:
    """Train tokenizer + model from the stdlib corpus and save them into out_dir.

    steps / max_corpus_bytes override the defaults (tests use them to build a
    smaller model fast). Returns the report that is also saved as build_report.json.
    """
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    t0 = time.time()
    steps = STEPS if steps is None else steps
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # torch's default may leave cores idle
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    texts = stdlib_texts(MAX_CORPUS_BYTES if max_corpus_bytes is None else max_corpus_bytes)
    if len(texts) < 2:
        raise ValueError("corpus too small: need at least one training and one validation file")
    val_idx = set(range(VAL_EVERY - 1, len(texts), VAL_EVERY)) or {len(texts) - 1}
    train_texts = [t for i, t in enumerate(texts) if i not in val_idx]
    val_texts = [t for i, t in enumerate(texts) if i in val_idx]

    # the tokenizer only sees training files, so validation CE is honest
    tokenizer = _train_tokenizer(train_texts)
    train_ids, val_ids = _pack(tokenizer, train_texts), _pack(tokenizer, val_texts)
    t_tok = time.time() - t0

    # the best context-free predictor: the bar a language model must clear
    p = torch.bincount(train_ids, minlength=len(tokenizer)).double()
    p = p[p > 0] / p.sum()
    unigram_entropy = float(-(p * p.log()).sum())

    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # one pass over fresh data: nothing to regularise
        bos_token_id=eot, eos_token_id=eot,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())

    # nanoGPT convention: decay matrices only, not biases and LayerNorm gains
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)

    def lr_at(it):
        if it < warmup:
            return LR * (it + 1) / warmup
        ratio = (it - warmup) / max(1, steps - warmup)
        return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * ratio))

    def batch():
        ix = torch.randint(len(train_ids) - BLOCK_SIZE - 1, (BATCH_SIZE,), generator=gen)
        x = torch.stack([train_ids[i:i + BLOCK_SIZE] for i in ix])
        y = torch.stack([train_ids[i + 1:i + 1 + BLOCK_SIZE] for i in ix])
        return x, y

    losses = []
    bar = _progress_bar() if progress else contextlib.nullcontext()
    t_train = time.time()
    model.train()
    with bar:
        task = bar.add_task(f"training {OFFLINE_MODEL}", total=steps, tps=0.0, loss=float("nan")) if progress else None
        for it in range(steps):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(it)
            x, y = batch()
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            losses.append(loss.item())
            if progress:
                tps = (it + 1) * BATCH_SIZE * BLOCK_SIZE / (time.time() - t_train)
                bar.update(task, advance=1, tps=tps, loss=sum(losses[-20:]) / len(losses[-20:]))
    t_train = time.time() - t_train

    # validation CE over non-overlapping windows of the held-out files
    model.eval()
    v = val_ids[:VAL_MAX_TOKENS + 1]
    T = min(BLOCK_SIZE, len(v) - 1)
    n = (len(v) - 1) // T * T
    x, y, total = v[:n].view(-1, T), v[1:n + 1].view(-1, T), 0.0
    with torch.no_grad():
        for xb, yb in zip(x.split(64), y.split(64)):
            logits = model(input_ids=xb).logits
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), yb.reshape(-1), reduction="sum").item()
    val_ce = total / y.numel()

    # our bar is the progress report; the shard-writing tqdm bar would only be noise
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes its internal class name; this one also loads with transformers 4
    cfg_path = out_dir / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()),
                                    "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")

    tail = losses[-min(50, len(losses)):]
    report = {
        "model": OFFLINE_MODEL, "version": MODEL_VERSION, "seed": seed,
        "unigram_entropy": unigram_entropy,  # nats/token, training tokens
        "train_loss": sum(tail) / len(tail),  # mean of the last <=50 steps, nats/token
        "val_ce": val_ce,  # nats/token, held-out files
        "val_tokens_evaluated": y.numel(), "build_seconds": time.time() - t0,
        "tokenizer_seconds": t_tok, "train_seconds": t_train,
        "n_params": n_params, "steps": steps, "batch_size": BATCH_SIZE, "block_size": BLOCK_SIZE,
        "tokens_seen": steps * BATCH_SIZE * BLOCK_SIZE,
        "train_tokens": len(train_ids), "val_tokens": len(val_ids),
        "corpus_files": len(texts), "val_files": len(val_texts),
        "corpus_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "vocab_size": len(tokenizer), "n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": N_EMBD,
        "n_positions": N_POSITIONS, "lr": LR, "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
    }
    # written last: its presence marks a finished build
    (out_dir / "build_report.json").write_text(artifact_json(report, allow_nan=True) + "\n")
    torch.set_num_threads(prev_threads)
    return report
