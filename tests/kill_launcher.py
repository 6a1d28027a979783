"""Test-only launcher: run the `harvest` command line in this process with a fault injected,
then die as SIGKILL does (no cleanup, no handler runs). Usable as a torchrun script.

    python tests/kill_launcher.py [--after-records K [--rank R]] [--at-mutation N] [--count FILE] -- ARGS

--after-records K: SIGKILL after this process wrote its K-th window record (rank R only).
--at-mutation N: SIGKILL just before this process's N-th change to storage (any write, create,
rename or remove through stores/fs.py or zarr's local store).
--count FILE: write how many changes to storage the run made (for a sweep over all of them).
"""
import argparse
import atexit
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sae_harvest.stores import fs  # noqa: E402

MUTATIONS = ("write_pieces", "write_atomic", "create_exclusive", "remove", "remove_key", "rename", "clear_except")


def count_mutations(on_change, set_attr=setattr):
    """Wrap every storage change so on_change(n) runs just before the n-th (n from 1); `set_attr`
    may be a pytest monkeypatch's setattr, which undoes it. Returns the counter {"n": ...}."""
    from zarr.storage import LocalStore

    lock, counter = threading.Lock(), {"n": 0}

    def tick():
        with lock:
            counter["n"] += 1
            n = counter["n"]
        on_change(n)

    for name in MUTATIONS:
        real = getattr(fs, name, None)
        if real is None:      # an older stores/fs.py (the sweep also runs against it)
            continue

        def wrapped(*a, _real=real, **k):
            tick()
            return _real(*a, **k)
        set_attr(fs, name, wrapped)
    for name in ("set", "delete"):
        real = getattr(LocalStore, name)

        async def wrapped_async(self, *a, _real=real, **k):
            tick()
            return await _real(self, *a, **k)
        set_attr(LocalStore, name, wrapped_async)
    return counter


def main():
    argv = sys.argv[1:]
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--after-records", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--at-mutation", type=int)
    parser.add_argument("--count")
    opts = parser.parse_args(argv[:split])
    if opts.after_records is not None:
        from sae_harvest.harvest import window

        def after_record(rank, written):
            if written == opts.after_records and opts.rank in (None, rank):
                os.kill(os.getpid(), signal.SIGKILL)
        window.after_record = after_record
    def die_at(n):
        if n == opts.at_mutation:
            os.kill(os.getpid(), signal.SIGKILL)
    counter = count_mutations(die_at)
    if opts.count:
        atexit.register(lambda: open(opts.count, "w").write(str(counter["n"])))
    import torch
    torch.set_num_threads(1)
    from sae_harvest.harvest.cli import entry
    sys.argv = ["harvest", *argv[split + 1:]]
    entry()


if __name__ == "__main__":
    main()
