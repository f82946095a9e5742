"""The live-id -> storage-row map shared by the backends.

Two sorted int64 arrays instead of a Python dict: a dict costs ~100 bytes per entry (100 MB at a million ids,
more than a 1%-dense CSR database itself), while the arrays cost 16 bytes and every operation is a vectorised
``searchsorted``; an insert or delete copies the arrays once per call (milliseconds at a million ids).
"""

from __future__ import annotations

import numpy as np


class RowMap:
    """Sorted live ids and the storage row of each."""

    def __init__(self, ids: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
        self.ids = np.empty(0, np.int64)
        self.rows = np.empty(0, np.int64)
        if ids is not None and ids.size:
            order = np.argsort(ids, kind="stable")
            self.ids = ids[order].astype(np.int64)
            self.rows = (np.arange(ids.size, dtype=np.int64) if rows is None else rows)[order].astype(np.int64)

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.rows.nbytes)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the sorted arrays, whether each id is present)."""
        pos = np.searchsorted(self.ids, ids)
        if not self.ids.size:
            return pos, np.zeros(ids.size, bool)
        hit = self.ids[np.minimum(pos, self.ids.size - 1)] == ids
        return pos, hit & (pos < self.ids.size)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.find(ids)[1]

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ids that are known to be present."""
        return self.rows[self.find(ids)[0]]

    def upsert(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Point ``ids`` at ``rows``; returns the rows that ids already present pointed at (now dead)."""
        pos, hit = self.find(ids)
        replaced = self.rows[pos[hit]].copy()
        self.rows[pos[hit]] = rows[hit]
        fresh = ~hit
        if fresh.any():
            order = np.argsort(ids[fresh], kind="stable")
            new_ids, new_rows = ids[fresh][order], rows[fresh][order]
            at = np.searchsorted(self.ids, new_ids)
            self.ids = np.insert(self.ids, at, new_ids)
            self.rows = np.insert(self.rows, at, new_rows)
        return replaced

    def delete(self, ids: np.ndarray) -> np.ndarray:
        """Drop ids known to be present; returns their rows."""
        pos = self.find(ids)[0]
        rows = self.rows[pos].copy()
        self.ids = np.delete(self.ids, pos)
        self.rows = np.delete(self.rows, pos)
        return rows

    def renumber(self, keep: np.ndarray) -> None:
        """Storage rows were compacted to those where ``keep`` is True: shift every row accordingly."""
        new_of_old = np.cumsum(keep, dtype=np.int64) - 1
        self.rows = new_of_old[self.rows]


class RowMapped:
    """Bookkeeping both backends share: live ids in a RowMap, one id per storage row, and a tombstone count.

    A backend mixes this in before VectorIndex and sets ``_map``, ``_row_ids`` and ``_n_dead``.
    """

    _map: RowMap
    _row_ids: np.ndarray
    _n_dead: int

    def _count(self) -> int:
        return len(self._map)

    def _contains(self, ids: np.ndarray) -> np.ndarray:
        return self._map.contains(ids)

    def _ids(self) -> np.ndarray:
        return self._map.ids.copy()

    @property
    def total_rows(self) -> int:
        return int(self._row_ids.size)

    @property
    def dead_rows(self) -> int:
        return self._n_dead
