"""Persistence behind a small interface (`Store`); nothing above it talks SQL."""

from halflife.storage.base import EventColumns, EventRecord, ItemRecord, Store, StoreError, StoreUnavailableError

__all__ = ["EventColumns", "EventRecord", "ItemRecord", "Store", "StoreError", "StoreUnavailableError"]
