"""``flower-superlink`` with plain log lines: ``python -m fedretain.compat.superlink ARGS``.

The SuperLink and the SuperExec it launches write their logs to stdout with ANSI colour
codes, hard-wired on; the platform sends that stream to ``logs/superlink.log``, which
operators read in editors and grep. Flower has no switch for it, so this entry point puts
a pipe in front of the log file before Flower starts: every process of the tree writes
into it (children inherit the descriptors) and one thread copies the lines to the file
without the codes. Flower itself runs through its published console-script function.
"""

from __future__ import annotations

import os
import sys
import threading

from fedretain.compat import check_versions
from fedretain.procs import strip_ansi

check_versions()


def _strip_into(read_fd: int, out_fd: int) -> None:
    with os.fdopen(read_fd, "rb") as pipe:
        for raw in pipe:
            os.write(out_fd, strip_ansi(raw.decode("utf-8", "replace")).encode("utf-8"))


def plain_output() -> threading.Thread:
    """Route this process's stdout/stderr (and its children's) through an ANSI-stripping pipe."""
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.dup(1)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    copier = threading.Thread(target=_strip_into, args=(read_fd, out), name="plain-log", daemon=True)
    copier.start()
    return copier


def main(argv: list[str] | None = None) -> int:
    from flwr.superlink.cli import flower_superlink  # the `flower-superlink` console script

    copier = plain_output()
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    try:
        flower_superlink()  # exits through SystemExit on errors and signals
    finally:  # let the copier drain what this process wrote (children may still hold the pipe)
        sys.stdout.flush()
        sys.stderr.flush()
        copier.join(timeout=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
