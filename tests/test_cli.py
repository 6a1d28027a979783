"""Console entry points: usage mistakes are one `error:` line and exit status 2, help exits 0."""
import re
import sys
from pathlib import Path

import pytest

from sae_harvest.evaluate import cli as evaluate_cli
from sae_harvest.harvest import cli as harvest_cli
from sae_harvest.train import cli as train_cli


@pytest.mark.parametrize("module, argv, message", [
    (harvest_cli, ["harvest", "run", "--model", "x"], "Missing option '--out'"),
    (harvest_cli, ["harvest", "run", "--out", "o", "--tokens", "many"], "'many' is not a valid integer"),
    (train_cli, ["train", "fit", "--store", "s"], "Missing option '--out'"),
    (train_cli, ["train", "fit", "--out", "o", "--k", "a,b"], "comma list of integers"),
    (evaluate_cli, ["evaluate", "splice", "--store", "s"], "Missing option '--sae'"),
    (evaluate_cli, ["evaluate", "nonsense"], "No such command"),
])
def test_usage_errors_are_one_line(module, argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        module.entry()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


@pytest.mark.parametrize("module, argv", [(harvest_cli, ["harvest", "run", "--help"]),
                                          (train_cli, ["train", "fit", "--help"]),
                                          (evaluate_cli, ["evaluate", "splice", "--help"])])
def test_help_exits_zero(module, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        module.entry()
    assert exit_info.value.code == 0
    assert "--help" in capsys.readouterr().out


def documents(doc: str, flag: str) -> bool:
    """Whether doc names the whole flag: `--k` is not named by `--kl-coeff`, nor `--site` by `--sites`."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", doc) is not None


def test_flag_matching_is_whole_flags():
    doc = "`--kl-coeff 0.5`, `--sites a,b`, `--no-grad-select`"
    assert not documents(doc, "--k") and not documents(doc, "--site") and not documents(doc, "--grad-select")
    assert documents(doc, "--kl-coeff") and documents(doc, "--sites") and documents(doc, "--no-grad-select")
    assert documents("| `--k` | TopK |", "--k") and documents("--k 16,32.", "--k")


def test_every_option_is_documented():
    """docs/cli.md names every option the configs generate, so the reference never falls behind."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    missing = [f"{group.name} {name} {flag}" for group in (harvest_cli.main, train_cli.main, evaluate_cli.main)
               for name, cmd in group.commands.items() for p in cmd.params
               for flag in p.opts + p.secondary_opts if flag.startswith("--") and flag != "--help"
               and not documents(doc, flag)]
    assert not missing, missing
