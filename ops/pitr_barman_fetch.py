"""Run by barman-cloud's own Python, not opsbook's (it imports only the standard library and barman): several
archived WAL segments fetched by one process through barman-cloud-wal-restore's own entry point, instead of one
new interpreter per segment (a Python start-up and boto3 import each, which on a small machine take the CPU
the base backup's restore needs at the same time).

Arguments: barman-cloud-wal-restore's own (endpoint, bucket URL, server name), `--`, then the segments in the
order recovery reads them. Each is fetched to NAME.part in the working folder and renamed to NAME once
complete, and its name is printed then; one that fails is skipped (recovery asks the engine for it again).
Exit status 1 when any failed.
"""

import os
import sys


def fetch(engine_arguments, segment):
    from barman.clients import cloud_walrestore  # lazy: barman is in the engine's Python, not opsbook's

    try:
        cloud_walrestore.main([*engine_arguments, segment, segment + ".part"])
    except SystemExit as exit_status:  # barman reports every failure as an exit
        if exit_status.code not in (None, 0):
            return False
    os.replace(segment + ".part", segment)
    return True


def main(arguments):
    split = arguments.index("--")
    failed = 0
    for segment in arguments[split + 1:]:
        if fetch(arguments[:split], segment):
            sys.stdout.write(segment + "\n")
            sys.stdout.flush()
        else:
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
