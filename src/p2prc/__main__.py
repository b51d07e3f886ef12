"""``python -m p2prc``."""

from .cli import main

main()
