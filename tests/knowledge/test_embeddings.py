"""The packaged MiniLM embedder: a batch runs its texts by length, a few at a time, and every
text still gets its own vector, in the order asked."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from backend.knowledge.embeddings import LocalEmbedder


async def test_a_batch_of_mixed_lengths_gets_each_texts_own_vector_in_order(
    embedder: LocalEmbedder,
) -> None:
    long = " ".join(["The connection pool hands out sockets and takes them back."] * 12)
    texts = ["Hi.", long, "How do I read a file line by line?", long[:200], "Bye now."] * 4
    together = np.asarray(await embedder.embed(texts))  # one batch, several forward passes
    alone = np.asarray([(await embedder.embed([text]))[0] for text in texts[:5]])
    assert together.shape == (len(texts), embedder.dimensions)
    for i, text in enumerate(texts):
        assert np.allclose(together[i], alone[i % 5], atol=1e-4), text[:40]
    # distinct texts stay distinct (nothing was reused across the length-sorted passes)
    assert float(together[0] @ together[1]) < 0.9


async def test_a_lone_request_does_not_wait_for_company_and_queued_ones_share_a_batch() -> None:
    """The batcher's grouping (no worker involved): what queued while the worker was busy goes
    in one batch at once; with no delay set, a lone request is not held for others."""
    from backend.knowledge.embeddings import _Pending

    loop = asyncio.get_running_loop()
    eager = LocalEmbedder(max_batch=4)
    queued = [_Pending([f"text {i}"]) for i in range(6)]
    for item in queued:
        eager._queue.put_nowait(item)
    first = await asyncio.wait_for(eager._gather_batch(loop), 30)
    second = await asyncio.wait_for(eager._gather_batch(loop), 30)
    assert first == queued[:4]  # up to max_batch texts
    assert second == queued[4:]  # the rest, without waiting for more
    patient = LocalEmbedder(max_delay_s=3600)  # an hour's delay: a lone request would wait it
    patient._queue.put_nowait(queued[0])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(patient._gather_batch(loop), 0.5)
    eager._queue.put_nowait(queued[0])
    assert await asyncio.wait_for(eager._gather_batch(loop), 30) == [queued[0]]
