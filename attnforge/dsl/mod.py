"""`Mod`: a traced or parsed score/mask modifier: its IR plus everything beside it.

The IR (``mod.ir``) is pure structure. Beside it live the parameter table (which captured value
each ``scalar``/``tensor`` leaf stands for), source locations for error messages, and the
original Python function for eager calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .ir import Node, pretty


@dataclass(frozen=True)
class SourceLoc:
    file: str
    line: int
    col: int = 0
    text: str = ""  # the source line, for carets

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass
class Param:
    """A captured value. ``getter`` re-reads it (closure cell, global, spec default)."""

    index: int
    name: str
    kind: str  # "scalar" | "tensor"
    node: Node
    value: Any
    getter: Callable[[], Any] | None = None

    def current(self) -> Any:
        return self.getter() if self.getter is not None else self.value


@dataclass
class Mod:
    """A score mod (``kind == "score"``) or a mask mod (``kind == "mask"``)."""

    kind: str
    ir: Node
    params: tuple[Param, ...] = ()
    fn: Callable | None = None
    name: str = "mod"
    locs: dict = field(default_factory=dict)  # Node -> SourceLoc

    @property
    def key(self) -> str:
        return self.ir.key

    def param_values(self) -> tuple:
        """Current values of the parameters, ordered by parameter index."""
        return tuple(p.current() for p in self.params)

    def tensor_params(self) -> list[Param]:
        return [p for p in self.params if p.kind == "tensor"]

    def pretty(self) -> str:
        return pretty(self.ir, names={p.node: p.name for p in self.params})

    def __call__(self, *args):
        if self.fn is not None:
            return self.fn(*args)
        from .evaluate import evaluate

        names = (
            ("score", "b", "h", "q_idx", "kv_idx")
            if self.kind == "score"
            else ("b", "h", "q_idx", "kv_idx")
        )
        if len(args) != len(names):
            raise TypeError(f"{self.name} takes {len(names)} arguments ({', '.join(names)})")
        fdt = args[0].dtype if self.kind == "score" and hasattr(args[0], "dtype") else None
        import torch

        return evaluate(
            self.ir,
            dict(zip(names, args)),
            self.param_values(),
            float_dtype=fdt if fdt is not None and fdt.is_floating_point else torch.float32,
        )

    def __repr__(self) -> str:
        return f"<{self.kind}_mod {self.name} key={self.ir.key[:12]}>"
