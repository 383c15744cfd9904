"""``fedretain consent`` as mounted in the front end: the consent CLI plus the feature registry it may not import.

The consent package sits below the feature code (data flows silo → consent gate → features),
so ``consent show`` learns which scopes each feature reads from here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedretain.consent.cli import consent, provide_feature_scopes

__all__ = ["consent"]


def _feature_scopes() -> Mapping[str, Iterable[str]]:
    from fedretain.features import FEATURES

    return {name: f.scopes for name, f in FEATURES.items()}


provide_feature_scopes(_feature_scopes)
