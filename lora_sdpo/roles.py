"""Role names: the one table that maps the speakers of public data to user / assistant / system.

Every reader (lora_sdpo/formats.py) and the overlap audit (lora_sdpo/audit.py) use it, so a pair
reads the same wherever it is compared. A source's `roles = {...}` extends it.
"""

from __future__ import annotations

ROLES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
}
TRAINED = ("user", "assistant", "system", "tool")  # the roles chat templates render


def role_table(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The default table with a source's `roles` added (keys compared in lower case)."""
    return {**ROLES, **{k.strip().lower(): v for k, v in (extra or {}).items()}}


def map_role(role, table: dict[str, str] = ROLES):
    """The canonical name of a role, or the role unchanged when the table does not know it."""
    return table.get(role.strip().lower(), role) if isinstance(role, str) else role


def table_text() -> str:
    """The default table for messages and docs: "human, prompter, ... -> user; ..."."""
    by = {}
    for k, v in ROLES.items():
        by.setdefault(v, []).append(k)
    return "; ".join(f"{', '.join(ks)} -> {v}" for v, ks in by.items())
