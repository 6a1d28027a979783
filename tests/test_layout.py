"""The code's shape: one namespace, one-way layering, no import cycles, and coexistence with
Hugging Face's own `evaluate` package."""
import ast
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stores", "harvest", "train", "evaluate")
# what each package may import from the others (the brief's layering; train's e2e uses harvest's sites)
ALLOWED = {"stores": set(), "harvest": {"stores"}, "train": {"stores", "harvest"},
           "evaluate": {"stores", "harvest", "train"}}


def _module(name: str) -> str | None:
    """`name` if it is one of our modules (sae_harvest.<pkg>.<module> or a package __init__)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[1] in PACKAGES:
        return name
    if len(parts) == 3 and parts[1] in PACKAGES and (ROOT / parts[1] / f"{parts[2]}.py").exists():
        return name
    return None


def _imports() -> dict[str, set[str]]:
    """{module: modules of ours it imports, anywhere in its body (lazy imports count too)}.
    `from pkg import mod` is an edge to mod, not to pkg's __init__."""
    graph = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            mod = f"sae_harvest.{pkg}.{path.stem}".removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    base = (f"sae_harvest.{pkg}" + (f".{node.module}" if node.module else "")) if node.level \
                        else node.module or ""
                    for alias in node.names:
                        target = _module(f"{base}.{alias.name}") or _module(base)
                        if target:
                            deps.add(target)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        target = _module(alias.name)
                        if target:
                            deps.add(target)
            graph[mod] = deps - {mod}
    return graph


def test_packages_import_only_downward():
    bad = []
    for mod, deps in _imports().items():
        pkg = mod.split(".")[1]
        for dep in deps:
            other = dep.split(".")[1]
            if other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, bad


def test_top_level_package_is_imported_by_nothing_of_ours():
    """api/__init__.py (installed as sae_harvest/__init__.py) re-exports from the four packages, lazily;
    none of them may import it back (`from sae_harvest import load_sae` inside the code)."""
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "sae_harvest":
                    bad += [f"{pkg}/{path.name}: from sae_harvest import {a.name}" for a in node.names
                            if a.name not in PACKAGES]
    assert not bad, bad


def test_no_import_cycles():
    graph = _imports()
    # a package's __init__ re-exports its modules: an edge into a package means its __init__
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):   # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package __init__ importing its own modules is not a cycle unless they import it back
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, cycles


def test_no_top_level_modules_outside_the_namespace(tmp_path):
    """From outside the repo, `import train` / `stores` / `harvest` find nothing of ours."""
    code = ("import importlib.util, json; print(json.dumps({n: (s.origin if (s := importlib.util.find_spec(n)) "
            "else None) for n in ['train', 'stores', 'harvest', 'evaluate']}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    import json
    found = json.loads(out.stdout)
    assert all(v is None or not v.startswith(str(ROOT)) for v in found.values()), found


def _nested_venv(env_dir: Path) -> tuple[str, dict]:
    """A venv that sees this interpreter's installed packages but not its PYTHONPATH; (python, env).

    Not `system_site_packages=True`: inside a venv or conda env that means the *base* interpreter's
    packages, which lack what this environment installed (torch, datasets), so the test only passed
    on a system interpreter. Instead a .pth file lists this interpreter's site-packages directories,
    after the new venv's own: what gets installed there (HF evaluate, ours) comes first. Listed as
    plain paths, their own .pth files (an editable install of ours) are not run."""
    import site
    import sysconfig

    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    here = [p for p in dict.fromkeys([*site.getsitepackages(), site.getusersitepackages(), *sys.path])
            if p and os.path.isdir(p) and os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")]
    target = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    Path(target, "zz_parent_env.pth").write_text("".join(f"{p}\n" for p in here if p != target))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    assert sysconfig.get_paths()["purelib"] != target
    return py, env


@pytest.mark.skipif(os.environ.get("SAE_HARVEST_SKIP_VENV") == "1", reason="SAE_HARVEST_SKIP_VENV=1")
def test_coexists_with_huggingface_evaluate(tmp_path):
    """A fresh venv with HF's `evaluate` installed next to ours: both import and work. Passes from a
    venv, a conda env and a system interpreter alike (see _nested_venv)."""
    env_dir = tmp_path / "venv"
    py, env = _nested_venv(env_dir)
    # this interpreter's pip installs into the venv (--python): no ensurepip, which is slow
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "--quiet", "--no-deps",
           "--disable-pip-version-check"]
    hf = subprocess.run(pip + ["evaluate==0.4.6"], capture_output=True, text=True, env=env)
    if hf.returncode != 0:
        pytest.skip(f"cannot install Hugging Face evaluate here: {hf.stderr.strip().splitlines()[-1:]}")
    ours = subprocess.run(pip + [str(ROOT)], capture_output=True, text=True, env=env)   # a regular install
    assert ours.returncode == 0, ours.stderr
    check = (
        "import evaluate, sae_harvest.evaluate as ours, sae_harvest.train, sae_harvest.harvest, sae_harvest.stores\n"
        "from sae_harvest import load_sae, open_store, __version__\n"
        "import sae_harvest, os\n"
        f"venv = {str(env_dir)!r}\n"
        "assert 'site-packages' in evaluate.__file__ and hasattr(evaluate, 'EvaluationModule'), evaluate.__file__\n"
        "assert evaluate.__file__.startswith(venv) and sae_harvest.__file__.startswith(venv), sae_harvest.__file__\n"
        "assert ours.__file__.startswith(venv) and hasattr(ours, 'evaluate_saes')\n"
        "import datasets, torch\n"   # what HF evaluate needs, from the environment the tests run in
        "print(evaluate.__version__, __version__)\n")
    out = subprocess.run([py, "-c", check], cwd=tmp_path, capture_output=True, text=True, env=env)
    version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert out.returncode == 0 and out.stdout.split() == ["0.4.6", version], out.stderr
    for argv in ([str(env_dir / "bin" / "evaluate"), "splice", "--help"],
                 [py, "-m", "sae_harvest.evaluate", "splice", "--help"],
                 [str(env_dir / "bin" / "train"), "fit", "--help"],
                 [str(env_dir / "bin" / "harvest"), "run", "--help"]):
        run = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert run.returncode == 0 and "--help" in run.stdout, (argv, run.stderr)
