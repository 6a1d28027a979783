from sae_harvest.train.cli import entry

entry()
