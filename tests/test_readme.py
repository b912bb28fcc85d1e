"""The README's two commands: CI runs exactly the test command; the run command is the one
`tests/test_cli.py::test_serve_on_embedded_defaults` exercises. Its GraphQL examples are valid
against the code's schema."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from graphql import OperationDefinitionNode, OperationType, build_schema, parse, validate

from backend.app import schema_sdl

ROOT = Path(__file__).resolve().parents[1]


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", text, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assignment = next(line for line in ci.splitlines() if line.startswith("TEST_COMMAND="))
    command = subprocess.run(  # let bash undo the quoting, as .ci/run does
        ["bash", "-c", f'{assignment}\nprintf %s "$TEST_COMMAND"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert command in _sh_blocks(readme)
    assert 'bash -c "$TEST_COMMAND"' in ci


def test_readme_run_command_serves_on_embedded_defaults() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    run = _sh_blocks(readme)[0]
    assert run.endswith("sightline serve")
    assert "SIGHTLINE_" not in run  # nothing to configure


def _graphql_blocks(text: str) -> list[str]:
    return re.findall(r"```graphql\n(.*?)\n```", text, flags=re.DOTALL)


def test_readme_graphql_examples_are_valid_as_pasted() -> None:
    """Each example parses and validates against the code's schema, as GraphiQL would run it:
    the first one failed as pasted ("This anonymous operation must be the only defined
    operation"). Where a block holds several operations each is named, and so is every
    subscription (GraphiQL sends only named ones over the WebSocket)."""
    schema = build_schema(schema_sdl())
    blocks = _graphql_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks, "the README has GraphQL examples"
    for block in blocks:
        document = parse(block)  # a syntax error fails here, naming the line
        errors = validate(schema, document)
        assert not errors, (block, [e.message for e in errors])
        operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
        for operation in operations:
            if len(operations) > 1 or operation.operation is OperationType.SUBSCRIPTION:
                assert operation.name is not None, (block, operation.operation)


def test_readme_model_table_is_what_sightline_models_prints() -> None:
    """The table of default vision models is generated from the manifests: after a model
    changes, paste `sightline models` into the README."""
    from typer.testing import CliRunner

    from backend.cli import app

    printed = CliRunner().invoke(app, ["models"])
    assert printed.exit_code == 0, printed.output
    table = printed.output.strip()
    assert table.startswith("| name | version | task | runtime |")
    assert "`rapidocr`" in table
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    indented = "\n".join(f"  {line}" for line in table.splitlines())
    assert indented in readme, f"paste into the README (indented by two spaces):\n{indented}"
