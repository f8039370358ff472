"""The `opsbook` console tool: invoke's Program over opsbook's task collection, usable from any directory.

`opsbook backup --env prod` is `inv backup --env prod` in a checkout; the inventory is `--inventory PATH`,
else $OPS_INVENTORY, else ./inventory.yaml. Command-line errors exit 2 with one line, as under `inv`.
"""

from __future__ import annotations

import os

from invoke import Argument, Program

from ops import __version__
from ops.cli import install_parser_checks, parsing_exits_2
from ops.quick_exit import ending_at_once
from runbooks.collection import ns


class OpsbookProgram(Program):
    command = "opsbook"  # named in the hints of command-line errors

    def core_args(self) -> list[Argument]:
        inventory = Argument(names=("inventory",), help="the inventory file (default: $OPS_INVENTORY, else "
                                                        "./inventory.yaml)")
        return [*super().core_args(), inventory]

    def parse_tasks(self) -> None:
        install_parser_checks()
        parsing_exits_2(self, super().parse_tasks)
        # a core flag is known only now, before or after the task names; the tasks read OPS_INVENTORY
        if self.args.inventory.value:
            os.environ["OPS_INVENTORY"] = self.args.inventory.value

    def parse_cleanup(self) -> None:
        parsing_exits_2(self, super().parse_cleanup)

    def execute(self) -> None:
        ending_at_once(Program.execute)(self)


def main() -> None:
    OpsbookProgram(namespace=ns, version=__version__, name="opsbook", binary="opsbook",
                   binary_names=["opsbook"]).run()
