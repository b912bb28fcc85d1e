"""A cost limit on documents: every field costs 1, times the page sizes of the lists above it.

Depth and alias limits bound the shape; this bounds the work: `first: 100` under `first: 100`
costs 10,000 even at depth 2. Page-size arguments given as variables count at their maximum,
since validation runs before variables are known.
"""

from __future__ import annotations

from typing import Any

from graphql import (
    FieldNode,
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


def complexity_rule(max_cost: int) -> type[ValidationRule]:
    class CostLimit(ValidationRule):
        def __init__(self, context: ValidationContext) -> None:
            super().__init__(context)
            self.fragments = {
                d.name.value: d
                for d in context.document.definitions
                if d.kind == "fragment_definition"
            }

        def enter_operation_definition(self, node: OperationDefinitionNode, *_: Any) -> None:
            cost = self._cost(node.selection_set, 1, frozenset())
            if cost > max_cost:
                name = node.name.value if node.name else "anonymous"
                self.report_error(
                    GraphQLError(
                        f"operation {name} costs {cost}, more than the maximum {max_cost}",
                        node,
                        extensions={
                            "code": "GRAPHQL_VALIDATION_FAILED",
                            "cost": cost,
                            "maxCost": max_cost,
                        },
                    )
                )

        def _cost(
            self, selections: SelectionSetNode | None, multiplier: int, seen: frozenset[str]
        ) -> int:
            if selections is None:
                return 0
            total = 0
            for selection in selections.selections:
                if isinstance(selection, FieldNode):
                    total += multiplier
                    total += self._cost(
                        selection.selection_set, multiplier * _page_size(selection), seen
                    )
                elif isinstance(selection, InlineFragmentNode):
                    total += self._cost(selection.selection_set, multiplier, seen)
                elif isinstance(selection, FragmentSpreadNode):
                    name = selection.name.value
                    fragment = self.fragments.get(name)
                    if fragment is not None and name not in seen:  # cycles: another rule's job
                        total += self._cost(fragment.selection_set, multiplier, seen | {name})
                if total > max_cost:
                    return total  # no need to count further
            return total

    return CostLimit


def _page_size(field: FieldNode) -> int:
    for argument in field.arguments or ():
        if argument.name.value in PAGE_ARGUMENTS:
            value = argument.value
            if isinstance(value, IntValueNode):
                return max(1, min(int(value.value), 10_000))
            if isinstance(value, VariableNode):
                return MAX_PAGE
    return 1
