"""Depth, alias and cost limits on GraphQL documents, measured in one pass linear in the document.

Each fragment is measured once and its measure reused wherever it is spread, so a document whose
fragments spread one another many times over (`fragment F1 { ...F0 ...F0 }`, `F2 { ...F1 ...F1 }`,
...) costs no more to check than it is long, while its cost (what executing it could resolve)
grows as the spreads multiply and is refused. Strawberry's depth limiter walks every spread
afresh: exponential in such documents, and it held the event loop for minutes.

- depth: the nesting of fields under a root field (`{ a { b } }` is 1); introspection fields
  (`__schema`, `__type`) do not count, as in Strawberry's QueryDepthLimiter.
- aliases: every alias written in the document, each definition counted once.
- cost: every field costs 1, times the page sizes of the lists above it; a page-size argument
  given as a variable counts at `MAX_PAGE`, since validation runs before variables are known.
- breadth: the most fields one selection set gathers, its fragments' included. The standard rule
  that fields can be merged (OverlappingFieldsCanBeMerged) compares fields sharing a response
  key pairwise: quadratic in the breadth. Bounding the breadth first bounds that rule's work.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    VariableNode,
)

PAGE_ARGUMENTS = frozenset({"first", "last", "count", "limit", "k"})
MAX_PAGE = 100  # what a page-size variable counts as
MAX_PAGE_LITERAL = 10_000  # a larger literal page size counts as this (the resolver caps it)
COST_CAP = 10**15  # costs saturate here: big enough to report, small enough to stay cheap


@dataclass(frozen=True)
class DocumentLimits:
    max_depth: int
    max_aliases: int
    max_cost: int
    max_breadth: int


@dataclass(frozen=True)
class Measure:
    depth: int  # levels of fields under the shallowest ones (a leaf alone is 0)
    cost: int
    width: int  # fields gathered at its own level, through inline fragments and spreads
    breadth: int  # the widest selection set anywhere inside (its own level included)


_NOTHING = Measure(0, 0, 0, 0)


def measure_document(document: DocumentNode) -> dict[OperationDefinitionNode, Measure]:
    """The depth and cost of each operation, visiting each selection once."""
    fragments: dict[str, FragmentDefinitionNode] = {}
    for definition in document.definitions:
        if isinstance(definition, FragmentDefinitionNode):
            fragments.setdefault(definition.name.value, definition)  # duplicates: another rule
    measured: dict[str, Measure] = {}
    for name in fragments:
        _measure_fragment(name, fragments, measured)
    return {
        definition: _measure_selections(definition.selection_set, measured)
        for definition in document.definitions
        if isinstance(definition, OperationDefinitionNode)
    }


def count_aliases(document: DocumentNode) -> int:
    count = 0
    pending: list[SelectionSetNode] = [
        d.selection_set
        for d in document.definitions
        if isinstance(d, OperationDefinitionNode | FragmentDefinitionNode)
    ]
    while pending:
        for selection in pending.pop().selections:
            if isinstance(selection, FieldNode) and selection.alias is not None:
                count += 1
            if isinstance(selection, FieldNode | InlineFragmentNode) and selection.selection_set:
                pending.append(selection.selection_set)
    return count


def _measure_fragment(
    name: str, fragments: dict[str, FragmentDefinitionNode], measured: dict[str, Measure]
) -> None:
    """Measures `name` after the fragments it spreads (depth first, without recursion).

    A fragment spread from inside its own cycle counts as nothing here: NoFragmentCyclesRule
    refuses such documents. So does an undefined one (KnownFragmentNamesRule).
    """
    if name in measured:
        return
    in_progress = {name}
    stack = [(name, iter(_spreads(fragments[name].selection_set)))]
    while stack:
        current, spreads = stack[-1]
        for spread in spreads:
            if spread in fragments and spread not in measured and spread not in in_progress:
                in_progress.add(spread)
                stack.append((spread, iter(_spreads(fragments[spread].selection_set))))
                break
        else:
            stack.pop()
            in_progress.discard(current)
            measured[current] = _measure_selections(fragments[current].selection_set, measured)


def _spreads(selection_set: SelectionSetNode) -> list[str]:
    """Names of the fragments spread anywhere inside a selection set (not inside those)."""
    names: list[str] = []
    pending = [selection_set]
    while pending:
        for selection in pending.pop().selections:
            if isinstance(selection, FragmentSpreadNode):
                names.append(selection.name.value)
            elif selection.selection_set is not None:
                pending.append(selection.selection_set)
    return names


class _Frame:
    """One selection set being measured: its selections still to see and what it sums to."""

    __slots__ = ("breadth", "cost", "depth", "kind", "page", "selections", "width")

    def __init__(self, selection_set: SelectionSetNode, kind: str, page: int) -> None:
        self.selections = iter(selection_set.selections)
        self.kind = kind  # "root", "field", "introspection" (a field adding no depth), "inline"
        self.page = page
        self.depth = 0
        self.cost = 0
        self.width = 0
        self.breadth = 0

    def add(self, depth: int, cost: int, width: int, breadth: int) -> None:
        self.depth = max(self.depth, depth)
        self.cost = min(self.cost + cost, COST_CAP)
        self.width = min(self.width + width, COST_CAP)
        self.breadth = max(self.breadth, breadth)

    def next_child(self, measured: dict[str, Measure]) -> _Frame | None:
        """Takes selections until one has a selection set of its own to measure first."""
        for selection in self.selections:
            if isinstance(selection, FieldNode):
                if selection.selection_set is None:
                    self.add(0, 1, 1, 0)
                    continue
                self.width = min(self.width + 1, COST_CAP)
                # Introspection fields add no depth, as in Strawberry's limiter.
                kind = "introspection" if selection.name.value.startswith("__") else "field"
                return _Frame(selection.selection_set, kind, _page_size(selection))
            if isinstance(selection, InlineFragmentNode):
                return _Frame(selection.selection_set, "inline", 1)
            spread = measured.get(selection.name.value, _NOTHING)
            self.add(spread.depth, spread.cost, spread.width, spread.breadth)
        return None

    def done(self, parent: _Frame) -> None:
        """Adds this finished selection set to the one it is in."""
        if self.kind == "inline":  # its fields are at its parent's level
            parent.add(self.depth, self.cost, self.width, self.breadth)
        else:
            depth = self.depth + 1 if self.kind == "field" else 0
            parent.add(depth, 1 + self.page * self.cost, 0, max(self.breadth, self.width))


def _measure_selections(selection_set: SelectionSetNode, measured: dict[str, Measure]) -> Measure:
    """Depth, cost and breadth of a selection set, given the measures of the fragments it
    spreads. Iterative (an explicit stack): nesting deeper than Python's recursion limit is
    measured, not crashed on."""
    stack = [_Frame(selection_set, "root", 1)]
    while True:
        frame = stack[-1]
        child = frame.next_child(measured)
        if child is not None:
            stack.append(child)
            continue
        stack.pop()
        if not stack:
            return Measure(frame.depth, frame.cost, frame.width, max(frame.breadth, frame.width))
        frame.done(stack[-1])


def _page_size(field: FieldNode) -> int:
    for argument in field.arguments or ():
        if argument.name.value in PAGE_ARGUMENTS:
            value = argument.value
            if isinstance(value, IntValueNode):
                return max(1, min(int(value.value), MAX_PAGE_LITERAL))
            if isinstance(value, VariableNode):
                return MAX_PAGE
    return 1


def limits_rule(limits: DocumentLimits) -> type[ValidationRule]:
    """A validation rule that refuses documents past the limits (one error per limit)."""

    class DocumentLimitsRule(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            document = context.document
            aliases = count_aliases(document)
            if aliases > limits.max_aliases:
                self.report_error(
                    GraphQLError(
                        f"{aliases} aliases found. Allowed: {limits.max_aliases}",
                        extensions={"code": "GRAPHQL_VALIDATION_FAILED"},
                    )
                )
            for operation, measure in measure_document(document).items():
                self._check(operation, measure)

        def _check(self, operation: OperationDefinitionNode, measure: Measure) -> None:
            name = operation.name.value if operation.name else "anonymous"
            checks = (
                ("depth", measure.depth, limits.max_depth, f"'{name}' exceeds maximum operation "
                 f"depth of {limits.max_depth}"),
                ("breadth", measure.breadth, limits.max_breadth, f"operation {name} gathers "
                 f"{measure.breadth} fields in one selection set (fragments included), more "
                 f"than the maximum {limits.max_breadth}"),
                ("cost", measure.cost, limits.max_cost, f"operation {name} costs "
                 f"{measure.cost}, more than the maximum {limits.max_cost}"),
            )  # fmt: skip
            for what, value, limit, message in checks:
                if value > limit:
                    extensions = {
                        "code": "GRAPHQL_VALIDATION_FAILED",
                        what: value,
                        f"max{what.capitalize()}": limit,
                    }
                    self.report_error(GraphQLError(message, operation, extensions=extensions))

    return DocumentLimitsRule
