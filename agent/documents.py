"""Documents that grow with the arrays, on a wire whose messages must not.

A plan, a fragment, a commit point, a manifest and a chunk index are each O(arrays); the
writers of a save are O(writers). No message of the agent's API carries a document larger than
the agent's inline limit (``AgentConfig.inline_document_bytes``, told to trainers in
``Registered.inline_limit_bytes``): a larger one travels as :class:`pb.DocumentPiece` messages
of the stream it belongs to (an announce, a replica, the session's events, ``ReadDocument``),
cut by :func:`pieces` and put back together by :class:`Assembly`; a listing leaves it out and
names it in ``SnapshotInfo.by_reference``. Writers ``rank00000 .. rank<N-1>`` travel as their
count. Both the trainer side and the daemon side use this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import MappingProxyType

from ckpt.format import writer_name

from .errors import DocumentError
from .pb import pb

DEFAULT_INLINE_LIMIT = 1 << 20  # bytes of one document inline in a message
MAX_DOCUMENT_BYTES = 1 << 30  # a document read back larger than this is refused, whoever sends it
MAX_WRITERS = 1 << 20  # writers of one save the agent accepts
MAX_LISTED_SEGMENTS = 1000  # AgentStatus.segments names at most this many (segments_total counts all)

KIND_NAMES = MappingProxyType({
    pb.DOCUMENT_KIND_PLAN: "plan",
    pb.DOCUMENT_KIND_FRAGMENT: "fragment",
    pb.DOCUMENT_KIND_COMMIT_POINT: "commit point",
    pb.DOCUMENT_KIND_MANIFEST: "manifest",
    pb.DOCUMENT_KIND_CHUNK_INDEX: "chunk index",
})
# Where SnapshotInfo carries each kind inline.
INFO_FIELDS = MappingProxyType({
    pb.DOCUMENT_KIND_PLAN: "plan_json",
    pb.DOCUMENT_KIND_FRAGMENT: "fragment_json",
    pb.DOCUMENT_KIND_COMMIT_POINT: "commit_point",
    pb.DOCUMENT_KIND_CHUNK_INDEX: "chunk_index_json",
})
# What a SnapshotInfo "with plans" carried before documents could be chosen.
DEFAULT_DOCUMENTS = (pb.DOCUMENT_KIND_PLAN, pb.DOCUMENT_KIND_FRAGMENT, pb.DOCUMENT_KIND_COMMIT_POINT)


def kind_name(kind: int) -> str:
    return KIND_NAMES.get(kind, f"document kind {kind}")


def pieces(kind: int, data: str | bytes, piece_bytes: int) -> Iterator[pb.DocumentPiece]:
    """``data`` as pieces of at most ``piece_bytes``, in order (one empty piece if it is empty)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    total = len(raw)
    for a in range(0, max(total, 1), piece_bytes):
        yield pb.DocumentPiece(kind=kind, offset=a, data=raw[a: a + piece_bytes], total_bytes=total)


class Assembly:
    """One document arriving in pieces: ``add`` each in order until it returns True."""

    def __init__(self, kind: int, limit: int, expected_bytes: int | None = None) -> None:
        self.kind = kind
        self.limit = limit
        self.expected = expected_bytes
        self._parts: list[bytes] = []
        self._received = 0
        self._total: int | None = None

    def add(self, piece: pb.DocumentPiece) -> bool:
        what = kind_name(self.kind)
        if piece.kind != self.kind:
            raise DocumentError(f"a piece of the {kind_name(piece.kind)} came while the {what} was arriving")
        total = piece.total_bytes
        if self._total is None:
            if total > self.limit:
                raise DocumentError(f"the {what} is {total} bytes, over the limit of {self.limit}")
            if self.expected is not None and total != self.expected:
                raise DocumentError(f"the {what} was announced as {self.expected} bytes, its pieces say {total}")
            self._total = total
        if total != self._total or piece.offset != self._received or self._received + len(piece.data) > total:
            raise DocumentError(f"a piece of the {what} at {piece.offset} (+{len(piece.data)} of {total} bytes) "
                                f"does not follow the {self._received} bytes received")
        self._parts.append(piece.data)
        self._received += len(piece.data)
        return self.done

    @property
    def done(self) -> bool:
        return self._total is not None and self._received == self._total

    def data(self) -> bytes:
        if not self.done:
            raise DocumentError(f"the {kind_name(self.kind)} ended after {self._received} of "
                                f"{self._total or '?'} bytes")
        return b"".join(self._parts)


def assemble(parts: Iterable[pb.DocumentPiece], kind: int, limit: int) -> bytes:
    """The document of a stream of pieces (``ReadDocument``'s answer)."""
    doc = Assembly(kind, limit)
    for piece in parts:
        if doc.add(piece):
            break
    return doc.data()


def inline_document(info: pb.SnapshotInfo, kind: int) -> bytes | None:
    """The document ``info`` carries inline, or None (left out by reference, or absent)."""
    value = getattr(info, INFO_FIELDS[kind])
    if not value:
        return None
    return value.encode() if isinstance(value, str) else value


def set_document(info: pb.SnapshotInfo, kind: int, data: bytes) -> None:
    field = INFO_FIELDS[kind]
    setattr(info, field, data if kind == pb.DOCUMENT_KIND_COMMIT_POINT else data.decode())


def writers_to_wire(writers: Sequence[str]) -> tuple[list[str], int]:
    """``(names, count)``: ``([], N)`` for rank00000 .. rank<N-1>, else ``(names, 0)``."""
    n = len(writers)
    if n and all(w == writer_name(r) for r, w in enumerate(writers)):
        return [], n
    return list(writers), 0


def writers_from_wire(names: Sequence[str], count: int) -> tuple[str, ...]:
    if count and names:
        raise DocumentError("writers and writer_count are both set")
    if count > MAX_WRITERS or len(names) > MAX_WRITERS:
        raise DocumentError(f"more than {MAX_WRITERS} writers")
    return tuple(writer_name(r) for r in range(count)) if count else tuple(names)
