"""Synthetic clinical notes: prompt strategies (M, P1, P2, P3) and their faithfulness audit."""

from dermaray.notes.audit import (
    FLAG_CODES,
    AuditResult,
    Facts,
    Flag,
    Tolerance,
    audit_note,
    extract_facts,
    flag_counts,
    hallucination_rate,
)
from dermaray.notes.prompts import (
    ALL_METADATA,
    NO_METADATA,
    STRATEGIES,
    MetadataSwitches,
    build_messages,
    describe_attributes,
    prompt_id,
    template_note,
)

__all__ = [
    "ALL_METADATA",
    "FLAG_CODES",
    "NO_METADATA",
    "STRATEGIES",
    "AuditResult",
    "Facts",
    "Flag",
    "MetadataSwitches",
    "Tolerance",
    "audit_note",
    "build_messages",
    "describe_attributes",
    "extract_facts",
    "flag_counts",
    "hallucination_rate",
    "prompt_id",
    "template_note",
]
