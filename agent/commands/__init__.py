"""Every `nodemesh` subcommand, one module per area; agent/cli.py imports each by name.

This is the top layer: a command may import anything below it, and nothing below imports a
command (tests/unit/test_layers.py checks both).
"""
