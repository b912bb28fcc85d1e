"""The toxicity rail: the packaged classifier (alt-profanity-check) reads abuse that the word list
does not list, sentence by sentence, on a message and on the answer's held-back chunks; off by
default; on both engines."""

from __future__ import annotations

from collections.abc import AsyncIterator

from backend.agents.guards import GuardAction, OutputPiece
from backend.auth.principal import Principal
from backend.guardrails import toxicity
from backend.guardrails.profanity import find_profanity
from backend.guardrails.service import GuardrailService
from tests.guardrails.conftest import Make

# Written for this test: abuse with no listed word, and ordinary text sharing its words.
ABUSE = "Thanks for nothing. You are a worthless, brain-dead idiot of a program."
ORDINARY = "How do I kill a zombie process in Linux? The killer whale question can wait."
POLITE = "Processes end when their parent reaps them. Use ps to find the zombie's parent. "
RUDE = "Only a pathetic moron would still be reading this garbage. "


async def _tokens(text: str) -> AsyncIterator[str]:
    for word in text.split(" "):
        yield word + " "


async def _answer(rails: GuardrailService, who: Principal, text: str) -> list[OutputPiece]:
    return [p async for p in rails.check_output_stream(who, _tokens(text))]


def test_the_classifier_reads_abuse_without_listed_words() -> None:
    assert not find_profanity(ABUSE)  # the word list lets it through
    assert toxicity.score(ABUSE) >= 0.75 > toxicity.score(ORDINARY)
    assert toxicity.score("") == 0.0
    # a text's score is its worst sentence's
    assert toxicity.score(POLITE + ABUSE) == toxicity.score(ABUSE.split(". ")[1])
    assert len(toxicity.sentences("a. " * 1000)) == toxicity.MAX_SENTENCES


async def test_a_message_is_scored_when_a_tenant_turns_the_rail_on(
    make: Make, who: Principal
) -> None:
    rails = make()
    assert (await rails.check_input(who, ABUSE, [])).decisions == ()  # off by default
    await rails.update_policy(who, {"toxicity": {"enabled": True}})
    warned = await rails.check_input(who, ABUSE, [])
    ordinary = await rails.check_input(who, ORDINARY, [])
    await rails.flush()  # the decisions' audit shares the test's one connection
    await rails.update_policy(who, {"toxicity": {"enabled": True, "action": "block"}})
    blocked = await rails.check_input(who, ABUSE, [])
    await rails.close()
    [decision] = warned.decisions
    assert (decision.rail, decision.action) == ("toxicity", GuardAction.WARN)
    assert decision.reason.startswith("score ")
    assert not warned.blocked
    assert ordinary.decisions == ()
    assert blocked.blocked


async def test_an_abusive_chunk_of_the_answer_is_never_sent(make: Make, who: Principal) -> None:
    rails = make()
    await rails.update_policy(
        who, {"toxicity": {"enabled": True}, "output": {"toxicity": True, "chunk_chars": 60}}
    )
    polite = await _answer(rails, who, POLITE * 2)
    rude = await _answer(rails, who, POLITE + RUDE + POLITE)
    await rails.flush()
    await rails.close()
    assert "".join(p.text for p in polite).split() == (POLITE * 2).split()  # whole
    assert all(p.decision is None for p in polite)
    sent = "".join(p.text for p in rude)
    assert "pathetic moron" not in sent
    assert sent.split()[:4] == POLITE.split()[:4]  # the chunk before it went out
    last = rude[-1]
    assert last.decision is not None
    assert (last.decision.rail, last.decision.action) == ("toxicity", GuardAction.BLOCK)
