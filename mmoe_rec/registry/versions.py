"""`model_versions(client, name)`: every version of a registered model, whatever quote its name holds."""
from __future__ import annotations

from typing import Any


def model_versions(client: Any, name: str) -> list[Any]:
    """The versions of registered model `name` (none if there is no such model). The name is quoted with the kind
    of quote it does not hold (register refuses a name with both)."""
    quote = '"' if "'" in name else "'"
    return list(client.search_model_versions(f"name = {quote}{name}{quote}"))
