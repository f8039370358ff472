"""`inv` in a checkout: opsbook's task collection (runbooks/collection.py). `inv --list` shows it.

Installed, the same collection is the `opsbook` console tool (runbooks/program.py). Everything else lives in
runbooks/ (one module per procedure) and ops/ (the library); exit codes are mapped in one place, ops/cli.py.
"""

from ops.cli import install_usage_errors
from runbooks.collection import ns

__all__ = ["ns"]

install_usage_errors()  # command-line errors: exit 2 and one line, before invoke parses the task flags
