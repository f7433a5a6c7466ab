"""How log lines name a user: never by the id itself, which an erasure
(DeleteUser) cannot take back out of a log file."""

from __future__ import annotations

import hashlib


def user_pseudonym(user_id: str) -> str:
    """"user" and the first 12 hex digits of the id's SHA-256: an operator who
    knows an id finds its lines (docs/serving.md says how). A pseudonym, not
    anonymity: ids that can be guessed or enumerated can be checked."""
    return "user " + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
