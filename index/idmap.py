"""Row <-> image_id of an index, kept in Arrow and numpy rather than Python objects.

A million ids cost their Arrow bytes plus 16 bytes a row (a 64-bit key and its sort
order); a lookup is a binary search. Keys are the first 16 hex digits of lakelens's
image ids (sha256 of the URI), so they are computed without a Python loop; other ids are
hashed one by one (blake2b) when the map is built.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HEX_ID_LEN = 32


def _hex_keys(ids: pa.StringArray) -> np.ndarray | None:
    """uint64 keys of 32-hex-digit ids in one vectorised pass; None if any id is not one."""
    if len(ids) == 0:
        return np.zeros(0, np.uint64)
    if ids.null_count or pc.any(pc.not_equal(pc.utf8_length(ids), HEX_ID_LEN)).as_py():
        return None
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset:ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)
    chars = data[offsets[0]:offsets[-1]].reshape(len(ids), HEX_ID_LEN)[:, :16]
    digits = np.full(256, 255, np.uint8)
    digits[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
    digits[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
    digits[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
    nibbles = digits[chars]
    if (nibbles == 255).any():
        return None
    weights = (np.uint64(16) ** np.arange(15, -1, -1, dtype=np.uint64)).astype(np.uint64)
    return (nibbles.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


def _hashed_keys(ids: pa.StringArray) -> np.ndarray:
    return np.fromiter((_hashed_key(i) for i in ids.to_pylist()), dtype=np.uint64, count=len(ids))


def _hashed_key(image_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


class IdMap:
    """image_id and uri per row, and the rows of given image ids."""

    def __init__(self, image_ids: pa.Array | pa.ChunkedArray, uris: pa.Array | pa.ChunkedArray,
                 live: np.ndarray):
        self.image_ids = _one_chunk(image_ids)
        self.uris = _one_chunk(uris)
        self.live = np.asarray(live, dtype=bool)
        keys = _hex_keys(self.image_ids)
        self.hex = keys is not None
        if keys is None:
            keys = _hashed_keys(self.image_ids)
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]

    def __len__(self) -> int:
        return len(self.image_ids)

    def key(self, image_id: str) -> int:
        if self.hex and len(image_id) == HEX_ID_LEN:
            try:
                return int(image_id[:16], 16)
            except ValueError:
                return -1
        return -1 if self.hex else _hashed_key(image_id)

    def row(self, image_id: str) -> int | None:
        """The live row of image_id, or None."""
        key = self.key(image_id)
        if key < 0:
            return None
        lo = np.searchsorted(self.sorted_keys, np.uint64(key), side="left")
        hi = np.searchsorted(self.sorted_keys, np.uint64(key), side="right")
        for r in self.order[lo:hi]:
            if self.live[r] and self.image_ids[int(r)].as_py() == image_id:
                return int(r)
        return None

    def rows_of(self, image_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int64 live row per id (-1 where the index has none), vectorised for hex ids."""
        ids = _one_chunk(image_ids)
        keys = _hex_keys(ids) if self.hex else _hashed_keys(ids)
        if keys is None:
            return np.array([-1 if (r := self.row(i)) is None else r for i in ids.to_pylist()],
                            dtype=np.int64)
        at = np.searchsorted(self.sorted_keys, keys)
        at = np.minimum(at, max(len(self.sorted_keys) - 1, 0))
        if not len(self.sorted_keys):
            return np.full(len(ids), -1, np.int64)
        rows = self.order[at].astype(np.int64)
        found = self.sorted_keys[at] == keys
        # the same 64-bit prefix twice in an index is ~never; confirm the full ids anyway
        same = pc.equal(self.image_ids.take(pa.array(rows)), ids).to_numpy(zero_copy_only=False)
        ok = found & same & self.live[rows]
        out = np.where(ok, rows, -1)
        for i in np.flatnonzero(found & ~ok):  # a prefix collision or a dead duplicate
            r = self.row(ids[int(i)].as_py())
            out[i] = -1 if r is None else r
        return out

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.live)


def _one_chunk(a: pa.Array | pa.ChunkedArray) -> pa.StringArray:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks() if a.num_chunks != 1 else a.chunk(0)
    if a.type == pa.large_string() or a.type == pa.string_view():
        a = a.cast(pa.string())
    return a
