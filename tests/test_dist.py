"""stores/dist.py: the one torch.distributed wrapper under harvest and train (issue 17 item 2): the
control messages are JSON bytes in tensors, never pickles, on 2 gloo processes on 127.0.0.1."""
import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, pickle, sys
import torch.distributed as tdist
def no_pickle(*a, **k):
    raise AssertionError("something was unpickled")
pickle.loads = pickle.load = no_pickle
for name in ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list"):
    setattr(tdist, name, no_pickle)
from sae_harvest.stores.dist import Dist, RankError
from sae_harvest.stores.errors import UserError
d = Dist.from_env("cpu")
out = {"rank": d.rank, "world": d.world}
out["gathered"] = d.all_gather({"rank": d.rank, "text": "é" * (d.rank + 1), "nested": [1, None, 2.5]})
out["broadcast"] = d.broadcast({"owner": "abc" if d.rank == 0 else "ignored", "n": d.rank})
out["none"] = d.broadcast(None if d.rank == 0 else "x")
out["sum"] = d.all_sum([d.rank + 1, 10])
out["agreed"] = d.agree(lambda: d.rank * 2)
def fails_on_1():
    if d.rank == 1:
        raise UserError("bad [input] on rank 1")
    return "fine"
try:
    d.agree(fails_on_1)
except UserError as e:
    out["error"] = [type(e).__name__, str(e)]
d.close()
print("RESULT " + json.dumps(out), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_control_messages_are_json_never_pickles():
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "LOCAL_WORLD_SIZE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], env={**env, "RANK": str(r), "LOCAL_RANK": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    results = []
    for p in procs:
        text = p.communicate(timeout=120)[0]
        assert p.returncode == 0, text
        results.append(json.loads(text.split("RESULT ", 1)[1]))
    for r in results:
        assert r["world"] == 2
        assert r["gathered"] == [{"rank": 0, "text": "é", "nested": [1, None, 2.5]},
                                 {"rank": 1, "text": "éé", "nested": [1, None, 2.5]}]
        assert r["broadcast"] == {"owner": "abc", "n": 0} and r["none"] is None
        assert r["sum"] == [3, 20] and r["agreed"] == 2 * r["rank"]
    assert results[1]["error"] == ["UserError", "bad [input] on rank 1"]            # its own error
    assert results[0]["error"] == ["RankError", "rank 1 stopped: bad [input] on rank 1"]


PICKLING_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                        "send_object_list", "recv_object_list"}


def test_no_module_uses_a_pickling_collective():
    used = []
    for folder in ("stores", "harvest", "train", "evaluate"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                name = getattr(node, "attr", None) or getattr(node, "id", None)
                if name in PICKLING_COLLECTIVES:
                    used.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not used, used
