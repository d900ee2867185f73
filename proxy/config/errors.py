"""The one exception the config layer raises."""

from __future__ import annotations


class ConfigError(Exception):
    """An invalid config. `errors` holds every problem found, each as
    `"<key path>: <message>"` optionally followed by ` (line N)`."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.errors))
