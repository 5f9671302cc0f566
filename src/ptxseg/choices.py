"""The base of every fixed choice (``--tta``, ``--layout``, ``--device`` ...) and its one rule
for refusing a value outside it.

Each choice is declared once, as a subclass of :class:`Choice`, by the module that owns it
(``Tta`` in :mod:`ptxseg.tta`, ``Layout`` in :mod:`ptxseg.data.sources`, ``Device`` in
:mod:`ptxseg.hardware` ...); the command line builds its options from those classes, so
``--help`` lists the values and nothing else is accepted. A member is a ``str``: it compares
equal to its value and prints as it (``f"{Tta.HFLIP}" == "hflip"``), so library functions take
either. Modules that declare a choice import nothing heavy at module level (no torch), which
keeps ``ptxseg --help`` fast.
"""

from __future__ import annotations

from enum import Enum

from ptxseg.errors import PtxsegError


class Choice(str, Enum):
    """A fixed set of string values (see the module doc)."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: str | Choice, option: str):
        """The member of ``value``; any other value is refused as ``{option}: unknown 'x'
        (valid: a, b)``, the command line's own message for a bad choice."""
        try:
            return cls(value)
        except ValueError:
            raise PtxsegError(
                f"{option}: unknown '{value}' (valid: {', '.join(cls.values())})"
            ) from None
