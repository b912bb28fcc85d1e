"""The GraphQL API's releases: the changelog format, the comparison with the last release, and
moving the release forward."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from graphql import build_schema

from backend.app import schema_sdl
from backend.graphql.evolution import (
    API_VERSION,
    CHANGELOG_FILE,
    RELEASED_SCHEMA_FILE,
    ReleaseRefused,
    compare,
    next_release_name,
    read_changelog,
    release,
    version_mismatch,
)

OLD = """
type Query { a: String! b: Int role: Role }
enum Role { OWNER MEMBER }
"""

CHANGELOG = """# Changelog

Announce like this:

```
## Unreleased

### Breaking

- `Field Query.example was removed.` (an example, not an announcement)
```

## Unreleased

### Breaking

- `Field Query.b was removed.` Deprecated for six months; nobody asked for it.
* `Field Query.a changed type from String! to Int.`
- not an announcement: no code span first, `Field Query.c was removed.`

### Added

- `Field Query.d was removed.` (listed under another heading: not an announcement)

## 2026-11-29.2

### Breaking

- `Field Query.e was removed.` (released already)

## 2026-11-29

First release.
"""


def test_the_changelog_announces_only_unreleased_breaking_list_items() -> None:
    log = read_changelog(CHANGELOG)
    assert log.releases == ("2026-11-29.2", "2026-11-29")
    assert log.latest == "2026-11-29.2"
    assert log.announced == {
        "Field Query.b was removed.",
        "Field Query.a changed type from String! to Int.",
    }


def test_compare_sorts_breaking_announced_and_dangerous_changes() -> None:
    new = "type Query { a: Int c: Int role: Role }\nenum Role { OWNER MEMBER GUEST }\n"
    announced = "## Unreleased\n### Breaking\n- `Field Query.b was removed.`\n"
    announced += "- `Field Query.z was removed.`\n"
    result = compare(new, OLD, read_changelog(announced))
    assert result.breaking == ("Field Query.a changed type from String! to Int.",)
    assert result.announced == ("Field Query.b was removed.",)
    assert result.dangerous == ("Enum value Role.GUEST was added.",)
    assert result.unmatched == ("Field Query.z was removed.",)
    assert not result.ok


def test_additions_are_never_breaking() -> None:
    new = (
        OLD.replace("role: Role }", "role: Role d(x: Int): [String!] }") + "type Extra { x: Int }\n"
    )
    result = compare(new, OLD, read_changelog(""))
    assert result.ok
    assert result.breaking == result.dangerous == ()


def test_the_committed_release_is_consistent() -> None:
    log = read_changelog(CHANGELOG_FILE.read_text(encoding="utf-8"))
    assert log.latest == API_VERSION
    assert version_mismatch(log) is None
    assert version_mismatch(log, "2000-01-01") is not None
    released = RELEASED_SCHEMA_FILE.read_text(encoding="utf-8")
    assert "apiVersion: String!" in released
    assert compare(schema_sdl(), released, log).ok
    assert build_schema(released)


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, Path]:
    files = {
        "baseline": tmp_path / "released.graphql",
        "changelog": tmp_path / "CHANGELOG.md",
        "version_file": tmp_path / "evolution.py",
    }
    files["baseline"].write_text(OLD, encoding="utf-8")
    files["changelog"].write_text(CHANGELOG, encoding="utf-8")
    files["version_file"].write_text('"""x"""\n\nAPI_VERSION = "2026-11-29.2"\n', encoding="utf-8")
    return files


def _contents(files: dict[str, Path]) -> dict[str, str]:
    return {name: path.read_text(encoding="utf-8") for name, path in files.items()}


def test_release_moves_the_baseline_the_changelog_and_the_version(repo: dict[str, Path]) -> None:
    new = "type Query { a: Int role: Role d: Int }\nenum Role { OWNER MEMBER }\n"
    result = release("2026-12-01", new, **repo)
    assert set(result.announced) == {
        "Field Query.b was removed.",
        "Field Query.a changed type from String! to Int.",
    }
    assert repo["baseline"].read_text(encoding="utf-8") == new
    assert repo["version_file"].read_text(encoding="utf-8").endswith('API_VERSION = "2026-12-01"\n')
    log = read_changelog(repo["changelog"].read_text(encoding="utf-8"))
    assert log.releases == ("2026-12-01", "2026-11-29.2", "2026-11-29")
    assert log.announced == set()  # the announcements now belong to the release
    text = repo["changelog"].read_text(encoding="utf-8")
    released = text.split("## 2026-12-01\n", 1)[1].split("## 2026-11-29.2", 1)[0]
    assert "- `Field Query.b was removed.` Deprecated" in released
    # the example in the fenced block stays as it was
    assert "```\n## Unreleased\n\n### Breaking\n\n- `Field Query.example" in text
    # the next check compares with the new release: nothing is breaking
    assert compare(new, repo["baseline"].read_text(encoding="utf-8"), log).ok

    # a release with nothing announced gets no empty Breaking heading
    release("2026-12-02", new + "type Extra { x: Int }\n", **repo)
    text = repo["changelog"].read_text(encoding="utf-8")
    assert "## Unreleased\n\n### Breaking\n\n## 2026-12-02\n\n## 2026-12-01\n" in text


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("v2", "not a release name"),
        ("2026-13-01", "not a release name"),
        ("2026-11-29", "not after the last release"),
        ("2026-11-29.2", "not after the last release"),
        ("2026-12-01", "breaking change(s) not announced"),
    ],
)
def test_a_refused_release_writes_nothing(repo: dict[str, Path], version: str, reason: str) -> None:
    before = _contents(repo)
    unannounced = "type Query { a: Int b: Int }\nenum Role { OWNER }\n"  # Role.MEMBER removed
    with pytest.raises(ReleaseRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        release(version, unannounced, **repo)
    assert _contents(repo) == before


def test_next_release_name() -> None:
    assert next_release_name("2026-11-29", date(2026, 12, 1)) == "2026-12-01"
    assert next_release_name("2026-12-01", date(2026, 12, 1)) == "2026-12-01.2"
    assert next_release_name("2026-12-01.2", date(2026, 12, 1)) == "2026-12-01.3"
