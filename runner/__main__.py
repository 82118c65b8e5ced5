"""`python -m runner` is the same as `dify-batch`."""

from .cli import main

main()
