"""Ingest a merchant silo: read raw tables in batches, validate, de-duplicate, quarantine, canonicalise.

Modules, one job each: ``api`` (load_silo/read_events/read_users, Silo), ``readers`` (CSV/Parquet
batches with record numbers), ``values`` (text, numbers, timestamps), ``rules`` (events and users
validation), ``dedupe`` (linear hash-based exact duplicates), ``quarantine`` (the rejected-rows
file), ``engine`` (the batch loop and conservation of rows), ``report`` (Problem, IngestReport),
``frames`` (to pandas at the edge), ``files`` (merchant.json, finding and writing tables).
"""

from fedretain.ingest.api import (
    DEFAULT_CHUNKSIZE,
    Silo,
    load_silo,
    read_events,
    read_raw_events,
    read_users,
    validate_events,
)
from fedretain.ingest.files import find_table, read_merchant, write_table
from fedretain.ingest.readers import RawBatch, RawTable
from fedretain.ingest.report import MAX_EXAMPLES_PER_REASON, IngestReport, Problem
from fedretain.mapping import IngestError

__all__ = [
    "DEFAULT_CHUNKSIZE",
    "MAX_EXAMPLES_PER_REASON",
    "IngestError",
    "IngestReport",
    "Problem",
    "RawBatch",
    "RawTable",
    "Silo",
    "find_table",
    "load_silo",
    "read_events",
    "read_merchant",
    "read_raw_events",
    "read_users",
    "validate_events",
    "write_table",
]
