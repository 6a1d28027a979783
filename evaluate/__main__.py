from evaluate.cli import entry

entry()
