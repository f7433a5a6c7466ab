"""Persistence behind a small interface (`Store`); nothing above it talks SQL."""

from halflife.storage.base import EventRecord, ItemRecord, Store, StoreError

__all__ = ["EventRecord", "ItemRecord", "Store", "StoreError"]
