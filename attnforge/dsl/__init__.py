"""Frontend: the IR and the two ways to produce it (Python tracing, the text DSL).

Imports nothing from ``attnforge.codegen`` or ``attnforge.runtime``.
"""

from . import ir
from .errors import DSLError
from .mod import Mod, Param, SourceLoc

__all__ = ["ir", "DSLError", "Mod", "Param", "SourceLoc"]
