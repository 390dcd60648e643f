"""The work of each ``rankscope`` command, one module per command; ``cli.py`` only declares options and exits."""
