"""A YAML parse error as the one line a user can act on: where it is and what is wrong."""
from __future__ import annotations

import yaml


def describe(exc: yaml.YAMLError) -> str:
    """'not valid YAML (line L, column C): PROBLEM', as far as the parser says."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = getattr(exc, "problem", None)
    return f"not valid YAML{where}{f': {problem}' if problem else ''}"
