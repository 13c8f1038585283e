"""The store's in-process copies (L1): bounded in bytes, everything counted (issue 24)."""

from __future__ import annotations

from cachegw import MemoryBackend
from cachegw._entry import Entry
from cachegw._store import HEADER_OVERHEAD, ITEM_OVERHEAD, L1, Store, item_size


def entry(body: bytes, headers: int = 0, tags: tuple[str, ...] = ()) -> Entry:
    return Entry(
        status=200,
        headers=[(b"x-h%d" % i, b"v" * 10) for i in range(headers)],
        body=body,
        stored_at=1.0,
        lifetime=60,
        tags=list(tags),
    )


def test_an_item_counts_its_key_body_headers_and_tags() -> None:
    item = entry(b"b" * 1000, headers=3, tags=("path:/x", "svc"))
    headers = 3 * (4 + 10)
    expected = 1 + ITEM_OVERHEAD + 1000 + HEADER_OVERHEAD * 5 + headers + len("path:/x") + 3
    assert item_size("k", item) == expected


def test_answers_count_and_leave_with_their_entry() -> None:
    l1 = L1(max_entries=10, max_bytes=3 * (ITEM_OVERHEAD + 1000) + 400, ttl=60)
    first, second = entry(b"1" * 999), entry(b"2" * 999)  # with a 1-byte key: 1000
    l1.put("a", first)
    l1.put("b", second)
    first.answers = {"GET": b"answer"}
    assert l1.charge("a", 500) and l1.bytes == 2 * (ITEM_OVERHEAD + 1000) + 500
    # More than the bound holds: the oldest goes, with its answers.
    assert l1.charge("b", ITEM_OVERHEAD + 1000)
    assert l1.get("a") is None and first.answers is None
    assert l1.bytes == 2 * (ITEM_OVERHEAD + 1000)
    # An answer too large for the bound pushes its own entry out: not kept.
    second.answers = {"GET": b"x"}
    assert not l1.charge("b", 10 * (ITEM_OVERHEAD + 1000))
    assert second.answers is None and l1.bytes == 0


async def test_entries_the_memory_backend_evicts_leave_the_l1() -> None:
    backend = MemoryBackend(max_entries=3)
    store = Store(backend, l1=L1(max_entries=100, max_bytes=2**20, ttl=60))
    for i in range(10):
        await store.set(f"k{i}", entry(b"body %d" % i), 60)
        assert await store.get(f"k{i}") is not None
    assert store.l1.stats()["entries"] == backend.stats()["entries"] == 3
    await store.delete("k9")
    assert store.l1.stats()["entries"] == 2
