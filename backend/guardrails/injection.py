# ruff: noqa: E501  (one signature per line reads better than regexes cut in pieces)
"""Jailbreak and prompt-injection detection: a packaged classifier and known attack signatures.

The classifier is `prompt-guardrail` (TF-IDF word n-grams and logistic regression, trained on
Mindgard's evaded injection samples against OpenAssistant prompts; sub-millisecond on short
text). It misses attacks phrased as role play, so the signatures below add the families that the
literature names: instruction override and prompt leaking (Perez & Ribeiro 2022, "Ignore Previous
Prompt"), persona jailbreaks without limits (Shen et al. 2024, "Do Anything Now"), and injected
role markers (Greshake et al. 2023, indirect injection). A text's score is the highest of the
classifier's probability and the signatures' weight, over every reading of the normalised text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from backend.guardrails.linear import LinearTextScorer
from backend.guardrails.normalize import Normalised

_W = r"[\s\W_]+"  # separators between words, whatever the attacker puts there
_ANY = rf"(?:{_W}(?:all|any|every|the|of|your|my|these|those|previous|prior|above|earlier|preceding|former|following|initial|original|old|current|existing|system|safety|other|given|openai'?s?)){{0,4}}"
_RULES = r"(?:instructions?|directions?|directives?|rules|guidelines|prompts?|polic(?:y|ies)|restrictions|programming|constraints|commands|guardrails|filters|training|context|inputs)"
_NO = r"(?:no|without|free\s+(?:of|from)|beyond|outside|ignoring|unbound\s+by|not\s+bound\s+by|(?:don'?t|doesn'?t|do\s+not|does\s+not)\s+(?:have|follow|care\s+about)(?:\s+an?y?)?|(?:has|have|with)\s+no|no\s+regard\s+(?:to|for))"
_LIMITS = r"(?:restrictions?|limitations?|limits|filters?|filtering|censorship|censor|guidelines|rules|boundaries|ethics|ethical\s+(?:guidelines|constraints)|morals?|morality|content\s+polic(?:y|ies)|constraints)"

# (weight, family, trigger words, pattern). A pattern runs only on text that holds one of its
# trigger words (a substring test costs microseconds; a regex over a long prompt, a millisecond).
_SIGNATURES: tuple[tuple[float, str, tuple[str, ...], str], ...] = (
    (
        0.95,
        "override",
        (
            "ignor",
            "disregard",
            "forget",
            "overrid",
            "bypass",
            "skip",
            "drop",
            "abandon",
            "discard",
            "neglect",
        ),
        rf"\b(?:ignore|disregard|forget|override|bypass|skip|drop|abandon|discard|neglect){_ANY}{_W}{_RULES}\b",
    ),
    (
        0.9,
        "override",
        ("instruction", "directive", "rules", "prompt"),
        r"\b(?:new|updated|real|true|actual|secret|hidden)\s+(?:system\s+)?(?:instructions|directives|rules|prompt)\s*(?::|from|are\b|follow\b)",
    ),
    (
        0.9,
        "leak",
        (
            "prompt",
            "instruction",
            "message",
            "rules",
            "configuration",
            "text",
            "guideline",
            "directive",
        ),
        rf"\b(?:reveal|show|print|output|repeat|display|dump|leak|give|tell|share|write|spell|encode|translate|what\s+(?:is|are|were)){_W}(?:me{_W})?(?:(?:all|everything\s+in|the\s+text\s+of|the\s+contents\s+of){_W})?(?:your|the|its|this\s+(?:ai|bot)'?s?){_W}(?:(?:full|complete|entire|exact|first|whole){_W})?(?:system|initial|original|hidden|secret|starting|internal|confidential|developer|pre-?prompt|previous|above|beginning){_W}?(?:prompt|instructions?|message|rules|configuration|text|guidelines|directives)\b",
    ),
    (
        0.85,
        "leak",
        ("prompt", "instruction", "config", "message", "string"),
        r"\b(?:repeat|print|output|show|reveal|display|dump|leak|encode|decode|translate|spell|recite|give|tell|share|complete|console\.log)\b[^.?!\n]{0,60}?\b(?:system|initial|initialization|hidden|secret|original|starting|pre)[\s_-]*(?:prompt|instructions?|configuration|config|message|string)s?\b",
    ),
    (
        0.85,
        "leak",
        ("you were", "you have been", "i was instructed", "what are you", "what were you"),
        r"\b(?:instructions|text|rules|prompt)\s+you\s+(?:were|have\s+been)\s+(?:given|told|provided)|\byou\s+were\s+(?:told|instructed|given|programmed)\s+(?:before|at\s+the\s+(?:start|beginning)|initially)|\bi\s+was\s+instructed\s+to\b|\bwhat\s+(?:are|were)\s+you\s+(?:not\s+supposed|told|instructed)\b",
    ),
    (
        0.85,
        "persona",
        ("filter", "censor", "moral", "ethic", "polic", "bound by"),
        r"\b(?:(?:has|have|with)\s+no|(?:does\s+not|doesn\'t|do\s+not|don\'t)\s+have\s+(?:a|any)|no|without|free\s+(?:of|from))\s+(?:any\s+)?(?:(?:content\s+)?filters?|filtering|censorship|morals?|morality|ethics|(?:moral|ethical)\s+(?:or\s+ethical\s+)?(?:restrictions|guidelines|constraints|limits|boundaries)|content\s+polic(?:y|ies))\b|\bnot\s+bound\s+by\s+any\s+(?:limits|rules|restrictions|guidelines|policies)\b",
    ),
    (
        0.8,
        "leak",
        ("your", "see", "read", "view", "access"),
        r"\byour\s+(?:system|initial|hidden|secret|original|pre)[\s-]*(?:prompt|instructions)\b|\b(?:see|read|view|access)\s+(?:the|your)\s+system\s+prompt\b",
    ),
    (0.8, "persona", ("mode",), r"\b(?:stay|remain)\s+in\s+(?-i:[A-Z][A-Z0-9]{2,})\s+mode\b"),
    (0.8, "leak", ("systemprompt", "system_prompt"), r"\bsystem_?prompt\b"),
    (
        0.9,
        "override",
        ("forget",),
        r"\bforget\s+(?:everything|all)\s+(?:that\s+)?(?:you\s+)?(?:have\s+)?(?:learned|learnt|were\s+told|know|knew|been\s+told)\b",
    ),
    (
        0.9,
        "override",
        ("void", "deleted", "removed", "disabled", "lifted", "suspended", "revoked", "no longer"),
        r"\b(?:policy|policies|rules|guidelines|restrictions|filters)\s+(?:is|are|was|were|has\s+been|have\s+been)\s+(?:now\s+)?(?:void|deleted|removed|disabled|lifted|suspended|revoked|no\s+longer\s+(?:valid|apply|applies|in\s+effect))\b",
    ),
    (
        0.85,
        "leak",
        ("above", "before"),
        r"\b(?:text|everything|words|instructions)\s+(?:above|before)\s+(?:this|here|starting|in\s+full)",
    ),
    (
        0.95,
        "persona",
        ("dan", "stan", "dude", "aim", "antigpt", "devmode", "anything now", "jailbr", "mode"),
        r"\b(?:(?-i:DAN|STAN|DUDE|AIM)|BetterDAN|AntiGPT|DevMode|Developer\s+Mode\s+(?:enabled|output|v\d|activated)|do\s+anything\s+now|jailbr(?:o|ea)ken|god\s*mode|evil\s*mode|unhinged\s+mode|chaos\s+mode)\b",
    ),
    (
        0.9,
        "persona",
        ("no", "without", "free", "beyond", "outside", "ignoring", "bound", "don", "doesn"),
        rf"\b(?:you|ai|assistant|chatbot|bot|model|gpt|chatgpt|character|persona|version|mode|he|she)\b[^.\n]{{0,80}}?\b{_NO}{_W}(?:any{_W})?(?:of{_W})?(?:(?:the|your|its|openai'?s?|moral|ethical|usual|typical|normal|standard){_W}){{0,2}}{_LIMITS}\b",
    ),
    (
        0.9,
        "persona",
        ("unfiltered", "uncensored", "unrestricted", "amoral", "unethical", "immoral", "filter"),
        r"\b(?:unfiltered|uncensored|unrestricted|amoral|unethical|immoral|unbiased\s+and\s+unfiltered|no-?filter)\b",
    ),
    (
        0.9,
        "persona",
        ("refuse", "decline", "deny", "reject", "say no", "character", "warn", "disclaimer"),
        r"\b(?:never|don'?t|do\s+not|will\s+not|won'?t|cannot|can'?t|must\s+not|shall\s+not)\s+(?:ever\s+)?(?:refuse|decline|deny|reject|say\s+no|break\s+character|warn|add\s+(?:a\s+)?(?:warnings?|disclaimers?))\b",
    ),
    (
        0.9,
        "persona",
        ("character", "role"),
        r"\b(?:stay|remain|keep)\s+in\s+(?:character|role)\b|\bbreak(?:ing)?\s+character\b",
    ),
    (
        0.85,
        "persona",
        ("question", "request", "prompt", "command", "demand"),
        r"\b(?:answer|respond\s+to|reply\s+to|fulfil+|comply\s+with)\s+(?:any|every|all)\s+(?:question|request|prompt|command|demand)s?\b(?:[^.]{0,40}\b(?:no\s+matter|regardless|even\s+if|without))",
    ),
    (
        0.85,
        "persona",
        ("openai", "anthropic", "google", "meta"),
        r"\b(?:openai|anthropic|google|meta)'?s?\s+(?:content\s+)?(?:polic(?:y|ies)|guidelines|rules|restrictions)\b",
    ),
    (
        0.8,
        "persona",
        ("language model",),
        r"\bas\s+an\s+ai\s+language\s+model\b|\blanguage\s+model\s+(?:without|with\s+no)\b",
    ),
    (
        0.9,
        "persona",
        ("no matter",),
        r"\bno\s+matter\s+how\s+(?:illegal|unethical|harmful|immoral|dangerous|offensive|inappropriate|explicit|wrong|evil)\b",
    ),
    (
        0.85,
        "persona",
        ("unlocked", "jailbroken", "liberated", "freed", "unchained", "unleashed"),
        r"\byou\s+(?:are|have\s+been|'re)\s+(?:now\s+)?(?:fully\s+|completely\s+)?(?:unlocked|jailbroken|liberated|freed|unchained|unleashed)\b",
    ),
    (0.8, "persona", ("both",), r"\b(?:respond|answer|reply|act|speak)\s+as\s+both\b"),
    (
        0.8,
        "persona",
        ("response", "answer", "personalit", "persona", "character"),
        r"\b(?:two|2|dual|both)\s+(?:different\s+|separate\s+)?(?:responses|answers|personalities|personas|characters|entities)\b",
    ),
    (
        0.8,
        "persona",
        ("pretend", "act", "behave", "imagine", "roleplay", "role-play"),
        r"\b(?:pretend|act|behave|imagine|roleplay|role-play)\b[^.]{0,80}\b(?:no|without|free\s+from)\s+(?:any\s+)?(?:rules|restrictions|limits|filters|morals|ethics)\b",
    ),
    (
        0.8,
        "persona",
        ("content", "stuff", "things", "response", "answer", "information"),
        r"\b(?:illegal|harmful|explicit|offensive|dangerous|nsfw)\s+(?:content|stuff|things|responses|answers|information)\b[^.]{0,60}\b(?:allowed|permitted|fine|ok|okay|acceptable|generate|produce|provide)\b",
    ),
    (
        0.9,
        "role",
        ("system", "admin", "developer", "root", "sudo"),
        r"(?:^|\n)\s*(?:\[|<|\{|#+\s*)?(?:system|admin|administrator|developer|root|sudo)\s*(?:\]|>|\}|:)\s*(?:override|mode|prompt|message|instructions?|update|note|command)?",
    ),
    (
        0.9,
        "role",
        ("mode", "override", "safety"),
        r"\b(?:system\s+override|maintenance\s+mode|debug(?:ging)?\s+mode\s+(?:enabled|activated|on)|admin(?:istrator)?\s+(?:mode|override)|sudo\s+mode|safety\s+(?:mode\s+)?(?:off|disabled))\b",
    ),
    (0.9, "role", ("</",), r"</\s*(?:document|context|system|instructions?|user|data)\s*>"),
    (
        0.85,
        "role",
        ("ai", "assistant", "chatbot", "llm", "model", "gpt", "bot"),
        r"\b(?:ai|assistant|chatbot|llm|model|gpt|bot)\s*[:,]\s*(?:please\s+)?(?:ignore|disregard|forget|you\s+must|from\s+now\s+on|new\s+task)",
    ),
    (
        0.85,
        "hijack",
        ("now on", "henceforth", "rest of"),
        r"\b(?:from\s+now\s+on|henceforth|for\s+the\s+rest\s+of\s+(?:this|our)\s+conversation)\b[^.]{0,60}\b(?:you\s+(?:are|will|must|shall)|your\s+(?:new\s+)?(?:name|role|goal|purpose))\b",
    ),
    (
        0.85,
        "hijack",
        ("you are",),
        r"\byou\s+are\s+(?:now\s+|no\s+longer\s+)(?:an?\s+)?(?:free|unrestricted|liberated|unleashed|chatgpt|an?\s+ai|assistant|bound|limited)?",
    ),
    (
        0.8,
        "hijack",
        ("say", "print", "output", "write", "reply"),
        r"\b(?:just|only)\s+(?:say|print|output|write|reply\s+with)\s+[\"'“]",
    ),
    (
        0.8,
        "hijack",
        ("stop everything", "nevermind"),
        r"\bstop\s+everything\b|\bnevermind\b[^.]{0,20}\bignore\b",
    ),
)
# A long message that gives the assistant a new identity and rules to live by re-programs it:
# most in-the-wild jailbreaks are such set-ups, however harmless their first lines read.
_PERSONA_CUES = re.compile(
    r"\b(?:(?:act|acting|behave|respond|reply|answer|speak|talk|write|role-?play|pretend|"
    r"personify|simulate|emulate|impersonate)\s+(?:as|like|to\s+be)\b|you\s+(?:are|will\s+be|"
    r"shall\s+be|must\s+be)\s+(?:now\s+)?(?:a|an|my|the|called|named|going\s+to\s+(?:act|be|"
    r"pretend))\b|your\s+(?:new\s+)?name\s+is\b|(?:persona|personality|character)\b)",
    re.IGNORECASE,
)
_RULE_CUES = re.compile(
    r"\b(?:always|never|must|do\s+not|don'?t|will\s+not|won'?t|only|from\s+now\s+on|"
    r"rules?|remember|at\s+all\s+times|under\s+no\s+circumstances)\b",
    re.IGNORECASE,
)
_PERSONA_SETUP_CHARS = 400

_COMPILED = tuple((w, fam, t, re.compile(p, re.IGNORECASE)) for w, fam, t, p in _SIGNATURES)


@cache
def _packaged_classifier() -> tuple[Any, Any]:
    """prompt-guardrail's vectorizer and model, loaded once per process (about 0.3 s)."""
    import warnings
    from importlib.resources import files

    import joblib

    models = files("guardify") / "models"
    with warnings.catch_warnings():  # pickled by scikit-learn 1.7.2; we pin that version
        warnings.simplefilter("ignore")
        vectorizer = joblib.load(str(models / "ig_ip_vectorizer.pkl"))
        classifier = joblib.load(str(models / "lg_ip_guardrails.pkl"))
    return vectorizer, classifier


@cache
def _packaged_scorer() -> LinearTextScorer | None:
    """The packaged classifier as plain arithmetic (None: a shape `linear` does not know)."""
    return LinearTextScorer.of(*_packaged_classifier())


@dataclass(frozen=True)
class InjectionScore:
    score: float  # 0..1
    source: str  # "classifier" or the signature family that scored highest
    reading: int  # which reading of the text (0: canonical, 1+: a variant)


class InjectionDetector:
    """Scores how likely a text is a jailbreak or an injected instruction. Thread-safe; the
    classifier loads on first use (about 0.3 s)."""

    def __init__(self, *, classifier: bool = True, classifier_chars: int = 2000) -> None:
        self._use_classifier = classifier
        self._classifier_chars = classifier_chars

    @property
    def _model(self) -> tuple[Any, Any] | None:
        return _packaged_classifier() if self._use_classifier else None

    def warm(self) -> None:
        if self._model is not None:
            self.classifier_probability(["warm up"])

    def classifier_probability(self, texts: list[str]) -> list[float]:
        if self._model is None:
            return [0.0] * len(texts)
        vectorizer, classifier = self._model
        half = self._classifier_chars // 2  # the start and the end of a long text
        clipped = [t if len(t) <= 2 * half else t[:half] + " " + t[-half:] for t in texts]
        scorer = _packaged_scorer()
        if scorer is not None:  # the same numbers without scikit-learn's per-call machinery
            return scorer.probabilities(clipped)
        features = vectorizer.transform(clipped)
        injection = list(classifier.classes_).index(1)
        return [float(p[injection]) for p in classifier.predict_proba(features)]

    def score(self, text: Normalised, *, document: bool = False) -> InjectionScore:
        """The highest score of any reading. `document`: the text is a passage the model will
        read (a retrieved chunk), not a user's message: only the signatures apply, because the
        classifier and the persona set-up learned what users send, and policies, handbooks
        and licences ("must not", "without restriction") look like that to them."""
        best = InjectionScore(0.0, "none", 0)
        readings = text.readings
        for i, reading in enumerate(readings):
            lowered = reading.lower()
            for weight, family, triggers, pattern in _COMPILED:
                if weight <= best.score or not any(t in lowered for t in triggers):
                    continue
                if pattern.search(reading):
                    best = InjectionScore(weight, family, i)
        if document:
            return best
        canonical = readings[0]
        if best.score < 0.75 and len(canonical) >= _PERSONA_SETUP_CHARS:
            personas = len(_PERSONA_CUES.findall(canonical))
            rules = len(_RULE_CUES.findall(canonical))
            if personas >= 2 and rules >= 3:
                best = InjectionScore(0.75, "persona_setup", 0)
        if best.score < 0.95:
            # the canonical text and any decoded payload; leetspeak variants are for signatures
            picked = [0] + [i for i, r in enumerate(readings[1:], 1) if " " in r and i < 4]
            for i, p in zip(
                picked, self.classifier_probability([readings[i] for i in picked]), strict=True
            ):
                if p > best.score:
                    best = InjectionScore(p, "classifier", i)
        return best
