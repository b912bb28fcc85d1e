"""What only the NeMo engine has: its configuration loads offline, and NeMo's own embedding
index runs on the packaged MiniLM through the provider Sightline registers."""

from __future__ import annotations

from nemoguardrails.embeddings.basic import BasicEmbeddingsIndex
from nemoguardrails.embeddings.index import IndexItem

from backend.core.db import Database
from backend.guardrails.nemo import ENGINE, NemoGuardrailService, load_config
from backend.knowledge.embeddings import LocalEmbedder


def test_the_packaged_config_names_our_flows_and_embeddings() -> None:
    config = load_config("x")
    assert config.rails.input.flows == ["sightline check input"]
    assert config.rails.output.flows == ["sightline check output"]
    assert config.rails.output.streaming.enabled
    [model] = [m for m in config.models if m.type == "embeddings"]
    assert model.engine == ENGINE
    assert model.parameters == {"instance": "x"}


async def test_nemo_embeds_offline_with_the_packaged_model(
    db: Database, embedder: LocalEmbedder
) -> None:
    rails = NemoGuardrailService(db, embedder=embedder)
    index = BasicEmbeddingsIndex(
        embedding_model="all-minilm-l6-v2",
        embedding_engine=ENGINE,
        embedding_params=rails.embedding_params,
    )
    await index.add_items(
        [IndexItem(text=t, meta={}) for t in ("refund my order", "reset my password")]
    )
    await index.build()
    [hit] = await index.search("I forgot my password and cannot sign in", max_results=1)
    assert hit.text == "reset my password"
