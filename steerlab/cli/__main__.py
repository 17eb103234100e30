"""``python -m steerlab.cli``."""

from steerlab.cli import main

main()
