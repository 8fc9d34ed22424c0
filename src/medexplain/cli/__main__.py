"""``python -m medexplain.cli``."""

from . import main

main()
