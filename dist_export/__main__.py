"""`python -m dist_export`: the command line (cli.run), in every process it starts."""
from .cli import run

run()
