"""The seed's evaluation entry point: `python evaluate_all_splits.py ...` == `revjepa evaluate`."""

import sys
from pathlib import Path

try:
    import revjepa  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from revjepa.cli import cmd_evaluate, run_guarded

if __name__ == "__main__":
    sys.exit(run_guarded(lambda argv: cmd_evaluate(argv, "evaluate_all_splits.py"), sys.argv[1:]))
