"""Consent: closed vocabulary, signed append-only ledger, point-in-time state, the gate, audit.

Knows nothing of Flower or torch, so a compliance officer's tools stay light.
"""

from fedretain.consent.gate import ConsentError, GatedData, GateDecision, apply_gate, decide
from fedretain.consent.ledger import ConsentLedger, LedgerError
from fedretain.consent.records import ConsentRecord
from fedretain.consent.vocab import PURPOSES, SCOPES, UnknownTermError

__all__ = [
    "ConsentError", "ConsentLedger", "ConsentRecord", "GateDecision", "GatedData", "LedgerError",
    "PURPOSES", "SCOPES", "UnknownTermError", "apply_gate", "decide",
]
