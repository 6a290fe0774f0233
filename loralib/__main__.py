"""`python -m loralib ...` is the `loralib` command (loralib/cli.py)."""
import sys

from .cli import main

sys.exit(main())
