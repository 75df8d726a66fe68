"""One module per `gpt2` subcommand.

Each module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`,
and keeps its top-level imports light (argparse only): heavy imports go inside
`run`, so `gpt2 --help` stays fast. `gpt2.cli` finds the modules by itself.
"""
