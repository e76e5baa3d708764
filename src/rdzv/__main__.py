"""`python -m rdzv`: the rdzv command line."""

from rdzv._cli import main

main(prog_name="rdzv")
