"""Saves profile snapshots to the store on a thread of its own.

A save waits for the store's writer: behind a group commit, or another
process's transaction on a shared file, for up to the busy timeout (10 s).
The read whose replay made the snapshot must not wait with it: with the save
in line, a miss took 3.1 s while another connection held the write lock for
3 s, against 0.04 s. A snapshot is only a shortcut, so one that cannot be
saved is dropped (logged, at most a line a minute while the store keeps
failing), and so is one that finds `MAX_PENDING` waiting.
"""

from __future__ import annotations

import collections
import logging
import threading

from halflife.interest.pseudonyms import user_pseudonym
from halflife.logs import RepeatedWarning
from halflife.storage.base import ProfileSnapshot, Store, StoreError

log = logging.getLogger(__name__)

MAX_PENDING = 8  # snapshots waiting to be saved (each up to a few MB)


class SnapshotSaver:
    def __init__(self, store: Store):
        self._store = store
        self._pending: collections.deque[tuple[str, ProfileSnapshot]] = collections.deque()
        self._saving = False
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None  # started by the first snapshot
        # A full disk fails every save, and with snapshots unsaved each miss of a heavy user replays and tries
        # again: a line a read (an audit: 30 reads, 30 warnings), on the full disk at times.
        self._failures = RepeatedWarning(log)

    def submit(self, user_id: str, snapshot: ProfileSnapshot) -> None:
        """Queues the save and returns at once."""
        with self._changed:
            if self._closed:
                return
            if len(self._pending) >= MAX_PENDING:
                log.info("profile snapshot of %s dropped: %d saves waiting", user_pseudonym(user_id), len(self._pending))
                return
            self._pending.append((user_id, snapshot))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="halflife-snapshots", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits until every queued save is done; False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._saving, timeout)

    def close(self, timeout: float) -> None:
        """Saves what is queued, for up to `timeout` seconds, and ends the
        thread (once the queue is done); later snapshots are dropped. Call
        before the store closes."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._changed:
            if self._pending:  # the store is about to close: they could only fail
                log.info("%d profile snapshots not saved: the store is closing", len(self._pending))
                self._pending.clear()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                user_id, snapshot = self._pending.popleft()
                self._saving = True
            try:  # the store refuses it if the user was erased since their events were read
                self._store.save_profile_snapshot(user_id, snapshot)
            except StoreError as e:
                self._failures.log("could not save the profile snapshot of %s: %s", user_pseudonym(user_id), e)
            except Exception:  # a bug here must not end the thread and strand later saves
                log.exception("saving the profile snapshot of %s failed", user_pseudonym(user_id))
            finally:
                with self._changed:
                    self._saving = False
                    self._changed.notify_all()
