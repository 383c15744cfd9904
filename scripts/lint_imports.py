"""Check the import contracts of ``[tool.importlinter]`` (pyproject.toml) with import-linter.

fedretain's subpackages ``fedretain.clients``, ``fedretain.server`` and ``fedretain.consent``
live in top-level folders (``clients/``, ``server/``, ``consent/``; see ``package-dir`` in
pyproject), which import-linter's graph builder cannot follow. This script lays the
package out as it is installed — a ``fedretain/`` folder of symlinks to the sources —
in a temporary folder and runs ``lint-imports`` against that layout. Exit status is
lint-imports'.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"clients": "clients", "server": "server", "consent": "consent"}


def stage(dest: Path) -> Path:
    pkg = dest / "fedretain"
    pkg.mkdir()
    for entry in (ROOT / "fedretain").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (pkg / name).symlink_to(ROOT / folder, target_is_directory=True)
    return pkg


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fedretain-imports-") as tmp:
        stage(Path(tmp))
        env = {**os.environ, "PYTHONPATH": tmp}
        cmd = [str(Path(sys.executable).parent / "lint-imports"), str(ROOT / "pyproject.toml"),
               "--no-cache", *sys.argv[1:]]
        return subprocess.call(cmd, env=env, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())
