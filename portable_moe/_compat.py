"""What Python 3.10 lacks and the project uses: ``StrEnum`` and a TOML reader."""

from __future__ import annotations

import sys
from enum import Enum

if sys.version_info >= (3, 11):
    from enum import StrEnum

    import tomllib
else:  # pragma: no cover (the test machines run 3.11+)
    import tomli as tomllib

    class StrEnum(str, Enum):
        """Members are their values: equal to, hashed, printed and formatted as the string."""

        __str__ = str.__str__
        __format__ = str.__format__
        __hash__ = str.__hash__


__all__ = ["StrEnum", "tomllib"]
