"""`python -m attnprobe.cli` and the `attnprobe` console script: the command line lives in app/cli.py."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
