from sae_harvest.evaluate.cli import entry

entry()
