"""Model aliases: each samples as set for it, else as suits its kind of model."""

from __future__ import annotations

from backend.agents.models import ModelRegistry
from backend.config import ChatSettings, ModelSpec
from backend.inference.llm import local
from backend.inference.llm.base import Sampling


async def test_the_packaged_model_samples_as_suits_a_135m_model() -> None:
    registry = await ModelRegistry.from_settings(
        ChatSettings(
            local_model=True,
            models={
                "careful": ModelSpec(provider="local", temperature=0.0, stop_repetition_tokens=0),
                "remote": ModelSpec(base_url="http://127.0.0.1:9/v1", top_p=0.5),
            },
        )
    )
    try:
        # llama.cpp's own defaults (temperature 0.7 as the server asked, no repeat penalty,
        # no stop) made SmolLM2-135M answer "Mmmmmmm…"; bench/chat_quality.py measured these.
        assert registry.resolve(None).sampling == local.RECOMMENDED_SAMPLING
        assert (
            Sampling(temperature=0.1, top_p=0.9, repeat_penalty=1.1, stop_repetition_tokens=48)
            == local.RECOMMENDED_SAMPLING
        )
        # an alias sets what it wants, the rest is its kind's default
        assert registry.resolve("careful").sampling == Sampling(
            temperature=0.0, top_p=0.9, repeat_penalty=1.1, stop_repetition_tokens=0
        )
        assert registry.resolve("careful").provider is registry.resolve(None).provider
        assert registry.resolve("remote").sampling == Sampling(temperature=0.7, top_p=0.5)
        assert registry.resolve(None).greedy.temperature == 0.0
        assert registry.resolve(None).greedy.stop_repetition_tokens == 48  # loops still stop
    finally:
        await registry.aclose()


async def test_the_flat_settings_tune_the_default_alias() -> None:
    registry = await ModelRegistry.from_settings(
        ChatSettings(llm_base_url="http://127.0.0.1:9/v1", temperature=0.3, seed=5)
    )
    try:
        assert registry.resolve(None).sampling == Sampling(temperature=0.3, seed=5)
    finally:
        await registry.aclose()
