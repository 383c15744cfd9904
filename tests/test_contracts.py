"""Structure contracts: no Flower/Opacus internals outside fedretain/compat; import layers hold.

import-linter checks the imports it can see (``[tool.importlinter]``, run by
``scripts/lint_imports.py``); this grep also catches names reached through attributes,
strings and lazy imports, in every source folder.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["fedretain", "clients", "server", "consent", "bench", "tests"]
ALLOWED = {ROOT / "fedretain" / "compat", ROOT / "tests" / "test_compat.py", ROOT / "tests" / "test_contracts.py"}

# Flower's public surface is flwr.app, flwr.serverapp, flwr.clientapp, flwr.client, flwr.server, flwr.common
# (top level) and flwr.simulation; Opacus's private names start with an underscore.
INTERNAL = re.compile(
    r"flwr\.(supercore|supernode|superlink|superexec|proto|cli)\b"
    r"|flwr\.common\.(serde|constant|config)\b"
    r"|flwr\.simulation\.run_simulation\b|\b_run_simulation\b"
    r"|from opacus[\w.]* import [^\n]*\b_[a-z]\w*"
    r"|\b_(generate_noise|check_processed_flag|mark_as_processed)\b"
    r"|\.history\s*=(?!=)"
    r"|\bHEARTBEAT_DEFAULT_INTERVAL\b|start_client_internal"
)


def _files() -> list[Path]:
    out = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if not any(path == a or a in path.parents for a in ALLOWED):
                out.append(path)
    return out


def test_no_flower_or_opacus_internal_outside_compat():
    hits = []
    for path in _files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if INTERNAL.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "non-public Flower/Opacus names outside fedretain/compat:\n" + "\n".join(hits)


def test_the_grep_finds_what_it_forbids(tmp_path):
    for bad in ("from flwr.supercore.retry import RetryInvoker", "from flwr.common.serde import x",
                "from opacus.optimizers.optimizer import _generate_noise", "acc.history = []",
                "from flwr.simulation.run_simulation import _run_simulation"):
        assert INTERNAL.search(bad), bad
    for ok in ("from flwr.serverapp import Grid", "from flwr.app import Message", "x = acc.history",
               "from opacus.accountants import RDPAccountant"):
        assert not INTERNAL.search(ok), ok


def test_no_module_over_450_lines_without_a_reason():
    long = []
    for folder in ("fedretain", "clients", "server", "consent"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if text.count("\n") > 450 and "longer than 450 lines because" not in text:
                long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert long == [], long


def test_import_contracts_hold():
    """import-linter (a test dependency) over pyproject's contracts; .ci/run also runs it before the suite."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint.py"), "--only", "imports"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout
