"""`inv` in a checkout: opsbook's task collection (runbooks/collection.py). `inv --list` shows it.

Installed, the same collection is the `opsbook` console tool (runbooks/program.py). Everything else lives in
runbooks/ (one module per procedure) and ops/ (the library); exit codes are mapped in one place, ops/cli.py.
"""

import sys

# invoke stops Python writing bytecode before it loads this file (for tasks files, unless --write-pyc), so every
# `inv` would compile opsbook's modules again; an installed package has them compiled. Python's own setting
# (-B, PYTHONDONTWRITEBYTECODE) still decides.
sys.dont_write_bytecode = bool(sys.flags.dont_write_bytecode)

from ops.cli import install_usage_errors  # noqa: E402 - after the line above, or nothing is compiled
from runbooks.collection import ns  # noqa: E402

__all__ = ["ns"]

install_usage_errors()  # command-line errors: exit 2 and one line, before invoke parses the task flags
