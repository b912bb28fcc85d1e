"""How the GraphQL API evolves: the last released schema, the changelog that announces breaking
changes, and the comparison of the code's schema with that release (`sightline schema check`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from graphql import GraphQLError, build_schema, find_breaking_changes, find_dangerous_changes

ROOT = Path(__file__).resolve().parents[2]
RELEASED_SCHEMA_FILE = ROOT / "schema" / "released.graphql"
CHANGELOG_FILE = ROOT / "CHANGELOG.md"
VERSION_FILE = Path(__file__).resolve()

# The GraphQL API release this code serves (`serverInfo.apiVersion`): the newest release in
# CHANGELOG.md, whose schema is schema/released.graphql. `sightline schema release` moves all
# three together.
API_VERSION = "2026-11-29"

UNRELEASED = "Unreleased"
BREAKING = "Breaking"
# A release is named by its date; a second release on one day gets a suffix: 2026-11-29.2
_RELEASE_NAME = re.compile(r"(\d{4}-\d{2}-\d{2})(?:\.([1-9]\d*))?")
_ANNOUNCEMENT = re.compile(r"\s*[-*]\s+`([^`]+)`")
_VERSION_LINE = re.compile(r'^API_VERSION = "[^"]*"$', flags=re.MULTILINE)


class UnreadableSchema(Exception):
    """The released schema is not valid SDL (a bad merge or a hand edit)."""


class ReleaseRefused(Exception):
    """`sightline schema release` would write an inconsistent release; nothing was written."""


@dataclass(frozen=True)
class Changelog:
    releases: tuple[str, ...]  # newest first
    announced: frozenset[str]  # graphql-core's descriptions under Unreleased, Breaking

    @property
    def latest(self) -> str | None:
        return self.releases[0] if self.releases else None


def read_changelog(text: str) -> Changelog:
    """Reads the release headings (`## 2026-11-29`) and the breaking changes announced for the
    next release: each list item under `## Unreleased` / `### Breaking` whose text starts with a
    code span holding graphql-core's description, e.g. ``- `Field Query.x was removed.` why``."""
    releases: list[str] = []
    announced: set[str] = set()
    section = subsection = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            continue
        elif line.startswith("## "):
            section, subsection = line[3:].strip(), None
            if section != UNRELEASED:
                releases.append(section.split()[0])
        elif line.startswith("### "):
            subsection = line[4:].strip()
        elif section == UNRELEASED and subsection == BREAKING:
            match = _ANNOUNCEMENT.match(line)
            if match:
                announced.add(match[1].strip())
    return Changelog(tuple(releases), frozenset(announced))


@dataclass(frozen=True)
class Compatibility:
    """The code's schema against the last release."""

    breaking: tuple[str, ...]  # breaking and not announced: the check fails
    announced: tuple[str, ...]  # breaking and announced in the changelog
    dangerous: tuple[str, ...]  # may change what a client sees (a new enum value): warnings
    unmatched: tuple[str, ...]  # announced, but no such change against the release

    @property
    def ok(self) -> bool:
        return not self.breaking


def compare(sdl: str, released_sdl: str, changelog: Changelog) -> Compatibility:
    """Compares the code's SDL with the released SDL; additions are never breaking."""
    try:
        old = build_schema(released_sdl)
    except GraphQLError as exc:
        raise UnreadableSchema(f"the released schema is not valid SDL: {exc}") from None
    new = build_schema(sdl)
    breaking = [c.description for c in find_breaking_changes(old, new)]
    dangerous = [c.description for c in find_dangerous_changes(old, new)]
    return Compatibility(
        breaking=tuple(d for d in breaking if d not in changelog.announced),
        announced=tuple(d for d in breaking if d in changelog.announced),
        dangerous=tuple(dangerous),
        unmatched=tuple(sorted(changelog.announced - set(breaking))),
    )


def version_mismatch(changelog: Changelog, api_version: str = API_VERSION) -> str | None:
    """Why the code's API_VERSION and the changelog disagree, or None when they agree."""
    if changelog.latest == api_version:
        return None
    return (
        f"serverInfo.apiVersion is {api_version} (API_VERSION in backend/graphql/evolution.py) "
        f"but the newest release in the changelog is {changelog.latest or 'missing'}"
    )


def _unreleased_headings(lines: list[str]) -> list[int]:
    found, fenced = [], False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.rstrip() == f"## {UNRELEASED}":
            found.append(number)
    return found


def _drop_empty_breaking(lines: list[str], unreleased: int) -> None:
    """Removes an empty `### Breaking` from the section that becomes the release."""
    for number in range(unreleased + 1, len(lines)):
        line = lines[number]
        if line.startswith("## "):
            return
        if line.rstrip() == f"### {BREAKING}":
            end = number + 1
            while end < len(lines) and not lines[end].strip():
                end += 1
            if end == len(lines) or lines[end].startswith("#"):
                del lines[number:end]
            return


def _release_key(name: str) -> tuple[str, int] | None:
    match = _RELEASE_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        date.fromisoformat(match[1])
    except ValueError:
        return None
    return match[1], int(match[2] or 1)


def next_release_name(current: str, today: date) -> str:
    """Today's date, with a suffix when a release already has today's date."""
    name = today.isoformat()
    key = _release_key(current)
    if key is None or key[0] != name:
        return name
    return f"{name}.{key[1] + 1}"


def release(
    version: str,
    sdl: str,
    *,
    baseline: Path = RELEASED_SCHEMA_FILE,
    changelog: Path = CHANGELOG_FILE,
    version_file: Path = VERSION_FILE,
) -> Compatibility:
    """Makes the code's schema the released one: writes it to `baseline`, turns the changelog's
    Unreleased section into the release `version` (under a new, empty Unreleased section) and
    sets API_VERSION in `version_file`. Refuses, writing nothing, while a breaking change is
    not announced."""
    text = changelog.read_text(encoding="utf-8")
    log = read_changelog(text)
    new_key, current = _release_key(version), log.latest
    if new_key is None:
        raise ReleaseRefused(f"{version!r} is not a release name (YYYY-MM-DD or YYYY-MM-DD.N)")
    current_key = _release_key(current) if current else None
    if current_key is not None and new_key <= current_key:
        raise ReleaseRefused(f"release {version} is not after the last release, {current}")
    compatibility = compare(sdl, baseline.read_text(encoding="utf-8"), log)
    if not compatibility.ok:
        raise ReleaseRefused(
            f"{len(compatibility.breaking)} breaking change(s) not announced in "
            f"{changelog.name} (`sightline schema check` lists them)"
        )
    lines = text.splitlines(keepends=True)
    headings = _unreleased_headings(lines)
    if len(headings) != 1:
        raise ReleaseRefused(f"{changelog.name} needs exactly one '## {UNRELEASED}' section")
    source = version_file.read_text(encoding="utf-8")
    source, found = _VERSION_LINE.subn(f'API_VERSION = "{version}"', source)
    if found != 1:
        raise ReleaseRefused(f"no single API_VERSION line in {version_file}")
    _drop_empty_breaking(lines, headings[0])
    lines[headings[0]] = f"## {UNRELEASED}\n\n### {BREAKING}\n\n## {version}\n"
    changelog.write_text("".join(lines), encoding="utf-8")
    baseline.write_text(sdl, encoding="utf-8")
    version_file.write_text(source, encoding="utf-8")
    return compatibility
