"""The packaged MiniLM embedder: a batch runs its texts by length, a few at a time, and every
text still gets its own vector, in the order asked."""

from __future__ import annotations

import numpy as np

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
