"""Name reservations: one pod per metadata tuple, one container per name in a pod attempt."""

from __future__ import annotations

import threading

from cri_runtime.errors import AlreadyExists


class NameIndex:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._owners: dict[str, str] = {}

    def reserve(self, name: str, owner: str, what: str) -> None:
        with self._guard:
            current = self._owners.get(name)
            if current is not None and current != owner:
                raise AlreadyExists(f"{what} {name!r} is already reserved for {current}")
            self._owners[name] = owner

    def release(self, name: str, owner: str) -> None:
        with self._guard:
            if self._owners.get(name) == owner:
                del self._owners[name]
