"""``python -m fedretain.clients.supernode``: Flower's stock SuperNode, launched with fedretain's tweaks.

The node supervisor (:mod:`fedretain.clients.supervisor`) starts the SuperNode through
this launcher so that, in the SuperNode's own process, it can cap the hard-coded 3 s idle
poll (``--poll-interval``), declare a shorter heartbeat than Flower's 30 s
(``--heartbeat-interval``, see ``docs/DEPLOYMENT.md``), exit with the supervisor
(``--parent-pid``) and report the node id and Flower's exit code in a JSON file
(``--status-file``). Everything that touches Flower's internals for this is in
:mod:`fedretain.compat.flower`; an untested flwr version stops the launcher with a
clear :class:`fedretain.compat.CompatError`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedretain.clients.supernode",
                                     description="flower-supernode with fedretain's launch options")
    parser.add_argument("--poll-interval", type=float, default=None)
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--status-file", type=Path, default=None)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    from fedretain.compat import CompatError

    try:
        from fedretain.compat.flower import run_supernode
    except CompatError as exc:
        sys.exit(f"fedretain: {exc}")
    run_supernode(rest, poll_interval=args.poll_interval, heartbeat_interval=args.heartbeat_interval,
                  parent_pid=args.parent_pid, status_file=args.status_file)


if __name__ == "__main__":
    main()
