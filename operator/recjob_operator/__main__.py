"""`python -m recjob_operator` is the `recjob` command."""

from .cli import main

main()
