"""The Strawberry schema: a thin adapter from GraphQL to the domain services."""
