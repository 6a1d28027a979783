"""Text in, packed token sequences out.

Documents are tokenized in order, joined with the separator token (the model's
EOS, else BOS), and cut into sequences of ctx_len tokens; when the tokenizer has a
BOS token every sequence starts with it (SAELens's prepend_bos), so position 0 is
always BOS and the trainer can drop it.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import os
import queue
import threading
from collections import deque
from itertools import islice
from typing import Iterator

import numpy as np

from .errors import HarvestError

OPENWEBTEXT = "Skylion007/openwebtext"

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def _local_files(path: str) -> tuple[str, list[str]]:
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _LOCAL_BUILDERS:
            raise HarvestError(f"dataset file {path}: unsupported type {ext!r} (use jsonl, json, parquet, txt, csv)")
        return _LOCAL_BUILDERS[ext], [path]
    for ext, builder in _LOCAL_BUILDERS.items():
        # the folder's name is literal: `corp[1]` is not a pattern matching corp1
        files = sorted(glob.glob(os.path.join(glob.escape(path), "**", f"*{ext}"), recursive=True))
        if files:
            return builder, files
    raise HarvestError(f"dataset directory {path} holds no jsonl, json, parquet, txt or csv files")


def open_dataset(name: str, split: str = "train", text_column: str = "text"):
    """A streaming (iterable) dataset; checks the text column exists."""
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")) or \
                os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise HarvestError(f"dataset {name} has no split {split!r}; it has {', '.join(ds)}")
                ds = ds[split]
            ds = ds.to_iterable_dataset()
        elif os.path.exists(name):
            builder, files = _local_files(name)
            # datasets reads data_files entries as patterns: escaped, d[1].jsonl is that file, not d1.jsonl
            ds = datasets.load_dataset(builder, data_files=[glob.escape(f) for f in files], split="train",
                                       streaming=True)
        else:
            try:
                ds = datasets.load_dataset(name, split=split, streaming=True)
            except RuntimeError as e:
                # datasets >= 4 runs no loading scripts; the hub keeps a parquet export of such repos
                if "scripts are no longer supported" not in str(e):
                    raise
                ds = datasets.load_dataset(name, split=split, streaming=True, revision="refs/convert/parquet")
    except HarvestError:
        raise
    except FileNotFoundError as e:
        raise HarvestError(f"dataset {name!r} not found ({str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # hub errors come in many types; the first line says what happened
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise HarvestError(f"cannot open dataset {name!r}: {msg}") from None
    try:
        first = next(iter(ds))
    except StopIteration:
        raise HarvestError(f"dataset {name!r} is empty") from None
    except Exception as e:
        raise HarvestError(f"cannot read dataset {name!r}: {str(e).splitlines()[0][:300]}") from None
    if text_column not in first:
        raise HarvestError(f"dataset {name!r} has no column {text_column!r}; columns: {', '.join(first)}")
    return ds


def separator_and_bos(tokenizer) -> tuple[int, int | None]:
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if sep is None:
        raise HarvestError("tokenizer has neither an EOS nor a BOS token to separate documents")
    return int(sep), tokenizer.bos_token_id


def rank_stream(ds, rank: int, world: int):
    """This rank's share of the documents: whole shards per rank when the shard count divides
    evenly, else every world-th document (datasets.distributed.split_dataset_by_node). Either
    way it is deterministic, so a store is reproducible for a given world size."""
    if world == 1:
        return ds
    from datasets.distributed import split_dataset_by_node
    return split_dataset_by_node(ds, rank=rank, world_size=world)


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def stream_fingerprint(ds, text_column: str, n_docs: int = 8) -> str:
    """sha256 over the first documents' text: a resume must see the same stream."""
    h = hashlib.sha256()
    for example in islice(iter(ds), n_docs):
        h.update((example[text_column] or "").encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def _guarded(iterator, first: int):
    """The examples, with a read error partway (arrow cast errors, I/O errors) as one line."""
    i = first
    while True:
        try:
            example = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise HarvestError(f"cannot read the dataset past document {i}: {msg}") from None
        yield example
        i += 1


def _state(ds):
    try:
        return copy.deepcopy(ds.state_dict())
    except Exception:   # not every iterable supports it; resume then skips documents unread
        return None


def packed_sequences(ds, tokenizer, ctx_len: int, text_column: str = "text", skip: int = 0,
                     doc_batch: int = 64) -> Iterator[np.ndarray]:
    """Yield int32 [ctx_len] sequences, skipping the first `skip`."""
    for i, (seq, _) in enumerate(positioned_sequences(ds, tokenizer, ctx_len, text_column, doc_batch=doc_batch)):
        if i >= skip:
            yield seq


def positioned_sequences(ds, tokenizer, ctx_len: int, text_column: str = "text", start: dict | None = None,
                         doc_batch: int = 64) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (int32 [ctx_len] sequence, stream position after it).

    A position is the document holding the sequence's last token (`doc`, counted in this
    stream), how many of that document's tokens (its separator included) are used up
    (`offset`), a hash of its text, and the HF IterableDataset state at the start of its
    tokenizer batch. Starting at a position loads that state, skips the few documents to `doc`
    without tokenizing them, checks the text hash, and drops `offset` tokens: no re-reading or
    re-tokenizing of what was harvested.
    """
    sep, bos = separator_and_bos(tokenizer)
    body = ctx_len - (1 if bos is not None else 0)
    index, skip_tokens, expect = 0, 0, None
    # (state, document it points at): the state of a fresh iterator is not trustworthy before
    # its first example, so the first batch reuses the state this run started from
    state, state_doc, first = None, 0, 0
    if start is not None:
        index, skip_tokens, expect = int(start["doc"]), int(start["offset"]), start["doc_sha"]
        if start.get("hf_state") is not None:
            try:
                ds.load_state_dict(copy.deepcopy(start["hf_state"]))
                state, state_doc = start["hf_state"], int(start["batch_doc"])
                first = state_doc
            except Exception:
                state, state_doc, first = None, 0, 0
    examples = _guarded(iter(ds), first)
    for _ in range(index - first):     # read, not tokenized: at most one tokenizer batch
        if next(examples, None) is None:
            raise HarvestError(f"the data stream differs from the one that made the store: it ends before "
                               f"document {index}, where the store's last window stopped")
    buffer: list[int] = []
    docs: deque = deque()     # [doc index, tokens left in buffer, tokens in total, text sha, batch doc, state]
    pulled = False
    while True:
        if pulled:
            state, state_doc = _state(ds), index
        batch_doc = state_doc
        pulled = True
        texts, metas = [], []
        before = index
        for example in islice(examples, doc_batch):
            text = example.get(text_column)
            if text is not None and not isinstance(text, str):
                raise HarvestError(f"dataset document {index}: column {text_column!r} holds a "
                                   f"{type(text).__name__} ({str(text)[:40]!r}), not text")
            if text:
                texts.append(text)
                metas.append(index)
            index += 1
        if index == before:      # the stream has ended
            return
        for text, doc, ids in zip(texts, metas, tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
            ids = ids + [sep]
            sha = text_sha(text)
            if expect is not None:   # the first document after a resume: the one the store stopped in
                if sha != expect:
                    raise HarvestError(f"the data stream differs from the one that made the store: document "
                                       f"{doc} at the resume point has changed")
                ids, expect = ids[skip_tokens:], None
            buffer.extend(ids)
            docs.append([doc, len(ids), len(ids) if doc != (start or {}).get("doc") else len(ids) + skip_tokens,
                         sha, batch_doc, state])
        if expect is not None:
            raise HarvestError(f"the data stream differs from the one that made the store: document "
                               f"{(start or {}).get('doc')} at the resume point is missing or empty")
        at = 0
        while len(buffer) - at >= body:
            chunk = buffer[at:at + body]
            at += body
            need = body
            while need:
                front = docs[0]
                take = min(front[1], need)
                front[1] -= take
                need -= take
                last = front
                if front[1] == 0:
                    docs.popleft()
            position = {"doc": last[0], "offset": last[2] - last[1], "doc_sha": last[3],
                        "batch_doc": last[4], "hf_state": last[5]}
            seq = ([bos] if bos is not None else []) + chunk
            yield np.asarray(seq, dtype=np.int32), position
        del buffer[:at]


class Background:
    """Run an iterator on a thread (tokenization off the compute thread), a bounded queue ahead."""

    _END = object()

    def __init__(self, iterator, depth: int = 256):
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(iterator,), daemon=True, name="tokenize")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator):
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:   # raised again on the consuming thread
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._END:
            self.queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()
