"""The one boundary around Flower's and Opacus's non-public internals.

fedretain uses Flower and Opacus through their public APIs everywhere except in this
package: :mod:`fedretain.compat.flower` (SuperNode launcher tweaks, the warm executor's
Runtime API calls, the in-process simulation entry point, Flower constants) and
:mod:`fedretain.compat.opacus` (the fused noise step of the DP optimizer). Internals
change without notice between releases, so every module here calls
:func:`check_versions` on import, and ``tests/test_compat.py`` fails loudly, naming the
package and both versions, on any release other than the one this code was read
against (:data:`TESTED`). An import contract (``[tool.importlinter]`` in pyproject) and
a grep test keep internal names out of the rest of the code.
"""

from __future__ import annotations

from importlib import metadata

TESTED: dict[str, str] = {"flwr": "1.42.0", "opacus": "1.6.0"}
"""The exact releases whose internals this package was read against."""


class CompatError(RuntimeError):
    """The installed Flower/Opacus is not the release fedretain's compat layer was written for."""


def installed_version(package: str) -> str:
    """The installed version of ``package`` (distribution metadata, not the module's own claim)."""
    return metadata.version(package)


def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


def version_problems(*, exact: bool = False) -> list[str]:
    """One line per package whose installed version differs from :data:`TESTED` (empty: all good).

    ``exact=False`` (at run time) accepts another patch release of the same ``major.minor``
    series, which pyproject allows; ``exact=True`` (the compat test) accepts only the tested one.
    """
    problems = []
    for package, tested in TESTED.items():
        try:
            found = installed_version(package)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed (fedretain was tested with {package} {tested})")
            continue
        same = found == tested if exact else _series(found) == _series(tested)
        if not same:
            problems.append(f"{package} {found} is installed, but fedretain.compat was written against "
                            f"{package} {tested}")
    return problems


def check_versions(*, exact: bool = False) -> None:
    """Raise :class:`CompatError` naming every package whose version differs from :data:`TESTED`."""
    problems = version_problems(exact=exact)
    if problems:
        raise CompatError("; ".join(problems) + ". Its non-public APIs used in fedretain/compat may have changed: "
                          "re-read them, update fedretain.compat and TESTED, or install the pins of "
                          "constraints.txt")


__all__ = ["TESTED", "CompatError", "check_versions", "installed_version", "version_problems"]
