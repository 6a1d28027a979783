"""Text in, packed token sequences out.

Documents are tokenized in order, joined with the separator token (the model's
EOS, else BOS), and cut into sequences of ctx_len tokens; when the tokenizer has a
BOS token every sequence starts with it (SAELens's prepend_bos), so position 0 is
always BOS and the trainer can drop it.
"""
from __future__ import annotations

import glob
import os
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
        files = sorted(glob.glob(os.path.join(path, "**", f"*{ext}"), recursive=True))
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
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
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


def packed_sequences(ds, tokenizer, ctx_len: int, text_column: str = "text",
                     skip: int = 0, doc_batch: int = 64) -> Iterator[np.ndarray]:
    """Yield int32 [ctx_len] sequences, skipping the first `skip` (for resume)."""
    sep, bos = separator_and_bos(tokenizer)
    body = ctx_len - (1 if bos is not None else 0)
    buffer: list[int] = []
    produced = 0

    def examples():
        it, i = iter(ds), 0
        while True:
            try:
                example = next(it)
            except StopIteration:
                return
            except Exception as e:   # a file that goes bad partway (arrow cast errors, I/O errors)
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                raise HarvestError(f"cannot read the dataset past document {i}: {msg}") from None
            yield i, example
            i += 1

    def docs():
        texts = []
        for i, example in examples():
            text = example.get(text_column)
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise HarvestError(f"dataset document {i}: column {text_column!r} holds a {type(text).__name__} "
                                   f"({str(text)[:40]!r}), not text")
            texts.append(text)
            if len(texts) == doc_batch:
                yield texts
                texts = []
        if texts:
            yield texts

    for texts in docs():
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(sep)
        start = 0
        while len(buffer) - start >= body:
            chunk = buffer[start:start + body]
            start += body
            produced += 1
            if produced > skip:
                seq = ([bos] if bos is not None else []) + chunk
                yield np.asarray(seq, dtype=np.int32)
        del buffer[:start]
