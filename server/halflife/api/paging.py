"""Page sizes and page tokens of the List RPCs (AIP-158)."""

from __future__ import annotations

import base64
import binascii

from halflife.api.validation import MAX_ITEMS_PER_REQUEST, Violations

DEFAULT_PAGE_SIZE = 100  # a page_size of 0
MAX_PAGE_SIZE = MAX_ITEMS_PER_REQUEST  # a larger page_size is read as this


def page_size(value: int, violations: Violations) -> int:
    """The page size a request's `page_size` asks for."""
    if value < 0:
        violations.add("page_size", f"must not be negative, got {value}: give 0 for the default "
                                    f"({DEFAULT_PAGE_SIZE}), or up to {MAX_PAGE_SIZE}")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def page_token(rpc: str, position: str) -> str:
    """The token of `rpc`'s page that starts after `position`: base64url of
    both, without padding (opaque to callers, and safe in URLs). The RPC's
    name keeps one List's token from reading as a place in another's list:
    a ListEvents token's "7.1c291ca3" is also a possible item id."""
    return base64.urlsafe_b64encode(f"{rpc}:{position}".encode()).rstrip(b"=").decode("ascii")


def token_position(token: str, violations: Violations, rpc: str) -> str | None:
    """The position a `page_token` of `rpc` holds: "" for none (the first
    page), None (and a violation) for a token not in the form `page_token`
    makes for `rpc`. Not signed: a token made in that form by hand lists
    from the position it names, which its caller may list anyway."""
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, ValueError):  # not base64, or not UTF-8 (UnicodeDecodeError is a ValueError)
        text = ""
    rpc_name, colon, position = text.partition(":")
    if rpc_name != rpc or not colon or page_token(rpc, position) != token:  # one spelling each: no other is ours
        violations.add("page_token", f"is not a {rpc} page token: give the next_page_token of the page before, or "
                                     "none for the first page")
        return None
    return position
