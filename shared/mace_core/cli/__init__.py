"""The `mace` command line: argument parsing and the commands, over the run layer."""
