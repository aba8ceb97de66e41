"""``python -m vmoe.cli ...`` is ``vmoe ...``."""

from vmoe.cli import console_main

console_main()
