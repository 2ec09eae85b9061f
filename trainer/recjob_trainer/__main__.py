"""`python -m recjob_trainer` is the `recjob-train` command."""

from .cli import main

main()
