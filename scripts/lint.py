"""Static checks run by ``.ci/run`` before the suite: ruff, mypy, then the import contracts.

mypy and import-linter need the package laid out as it is installed (``fedretain.clients``
lives in ``clients/``, ...; see ``package-dir`` in pyproject), so both run against a
temporary ``fedretain/`` folder of symlinks to the sources (:func:`stage`). Settings are
pyproject's ``[tool.ruff]``, ``[tool.mypy]`` and ``[tool.importlinter]``. Exits non-zero
if any check fails; ``--only ruff|mypy|imports`` runs one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"clients": "clients", "server": "server", "consent": "consent"}
BIN = Path(sys.executable).parent


def stage(dest: Path) -> Path:
    """``dest/fedretain``: the installed package layout, as symlinks to the source folders."""
    pkg = dest / "fedretain"
    pkg.mkdir()
    for entry in (ROOT / "fedretain").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (pkg / name).symlink_to(ROOT / folder, target_is_directory=True)
    return pkg


def run(name: str, cmd: list[str], **kw: object) -> int:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, **kw)  # type: ignore[arg-type]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["ruff", "mypy", "imports"], default=None)
    args = ap.parse_args()
    config = str(ROOT / "pyproject.toml")
    failed = []
    with tempfile.TemporaryDirectory(prefix="fedretain-lint-") as tmp:
        stage(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp, "MYPYPATH": tmp}
        checks = {
            "ruff": ([str(BIN / "ruff"), "check", "--config", config, str(ROOT)], {"cwd": ROOT}),
            "mypy": ([sys.executable, "-m", "mypy", "--config-file", config, "-p", "fedretain"],
                     {"cwd": tmp, "env": env}),
            "imports": ([str(BIN / "lint-imports"), config, "--no-cache"], {"cwd": tmp, "env": env}),
        }
        for name, (cmd, kw) in checks.items():
            if args.only in (None, name) and run(name, cmd, **kw) != 0:
                failed.append(name)
    if failed:
        print(f"static checks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("static checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
