"""The seed's training entry point: `python train_jepa.py ...` == `revjepa train ...`."""

import sys
from pathlib import Path

try:
    import revjepa  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from revjepa.cli import cmd_train, run_guarded

if __name__ == "__main__":
    sys.exit(run_guarded(lambda argv: cmd_train(argv, "train_jepa.py"), sys.argv[1:]))
