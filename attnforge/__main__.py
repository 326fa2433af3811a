"""Command line: ``python -m attnforge inspect|knobs|cache``.

    python -m attnforge inspect examples/sliding_window.py            # IR, block map, fwd source
    python -m attnforge inspect examples/alibi.py --len 512 --source none
    python -m attnforge knobs                                         # every ATTNFORGE_* variable
    python -m attnforge cache [--clear]                               # kernel cache statistics

``inspect`` runs the file as a module whose ``__name__`` is not ``"__main__"`` (so its demo does
not run) and shows every attention variant defined at module level: ``af.variant`` /
``parse_spec`` results, decorated or ``generate_*``-built mods (also inside module-level dicts,
lists and tuples), ``BlockMask`` objects, the results of argument-free ``generate_*`` functions
defined in the file, and plain FlexAttention-style functions defined in the file (recognised by
their parameters: ``(score, b, h, q_idx, kv_idx)`` or ``(b, h, q_idx, kv_idx)``).
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
import os
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

RUN_NAME = "__attnforge_inspect__"


# -- collecting variants from a file --


def load_namespace(path: str) -> dict[str, Any]:
    """Execute ``path`` like a script would see it (its folder on sys.path), demo skipped."""
    file = Path(path).resolve()
    if not file.is_file():
        raise SystemExit(f"attnforge inspect: no such file: {path}")
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    sys.path.insert(0, str(file.parent))
    sys.argv = [str(file)]
    try:
        return runpy.run_path(str(file), run_name=RUN_NAME)
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv


def _classify(obj: Any):
    """'variant' | 'mod' | 'block_mask' | None."""
    from attnforge.dsl.mod import Mod
    from attnforge.runtime.variant import Variant

    if isinstance(obj, Variant):
        return "variant"
    if isinstance(obj, Mod):
        return "mod"
    if type(obj).__name__ == "BlockMask" and hasattr(obj, "kv_num_blocks"):
        return "block_mask"
    return None


def _mod_of(obj: Any):
    """A decorated mod may be a Mod or a wrapper exposing one (``.mod`` / ``.ir``)."""
    from attnforge.dsl.mod import Mod

    if isinstance(obj, Mod):
        return obj
    inner = getattr(obj, "mod", None)
    return inner if isinstance(inner, Mod) else None


def find_variants(namespace: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(name, kind, object)`` for every inspectable object, in definition order, once each."""
    found: list[tuple[str, str, Any]] = []
    seen: set[int] = set()

    def visit(name: str, obj: Any, depth: int = 0) -> None:
        if id(obj) in seen:
            return
        kind = _classify(obj)
        if kind is None and _mod_of(obj) is not None:
            kind, obj = "mod", _mod_of(obj)
        if kind is not None:
            seen.add(id(obj))
            found.append((name, kind, obj))
        elif depth == 0 and isinstance(obj, dict):
            for key, value in obj.items():
                visit(f"{name}[{key!r}]", value, 1)
        elif depth == 0 and isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                visit(f"{name}[{i}]", value, 1)

    for name, obj in list(namespace.items()):
        if name.startswith("__"):
            continue
        visit(name, obj)
        if name.startswith("generate_") and _argument_free_local(obj):
            visit(f"{name}()", obj())
        elif _plain_mod_kind(obj) and id(obj) not in seen:
            seen.add(id(obj))
            found.append((name, f"{_plain_mod_kind(obj)}_mod function", obj))
    return found


def _plain_mod_kind(fn: Any) -> str | None:
    """A FlexAttention-style function defined in the file: ``(score, b, h, q_idx, kv_idx)`` is
    a score mod, ``(b, h, q_idx, kv_idx)`` a mask mod (judged by the parameter names)."""
    if not pyinspect.isfunction(fn) or fn.__module__ != RUN_NAME:
        return None
    names = list(pyinspect.signature(fn).parameters)
    if names == ["score", "b", "h", "q_idx", "kv_idx"]:
        return "score"
    if names == ["b", "h", "q_idx", "kv_idx"]:
        return "mask"
    return None


def _argument_free_local(fn: Any) -> bool:
    if not pyinspect.isfunction(fn) or fn.__module__ != RUN_NAME:
        return False
    params = pyinspect.signature(fn).parameters.values()
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in params)  # fmt: skip


def as_variant(kind: str, obj: Any):
    from attnforge.runtime.variant import Variant

    if kind == "variant":
        return obj
    if kind == "mod":
        return Variant(**{f"{obj.kind}_mod": obj}, name=obj.name)
    if kind.endswith("_mod function"):
        return Variant(**{f"{_plain_mod_kind(obj)}_mod": obj}, name=obj.__name__)
    return None


# -- printing --


def _banner(text: str) -> str:
    return f"== {text} " + "=" * max(3, 96 - len(text))


def show(name: str, kind: str, obj: Any, args: argparse.Namespace, out) -> bool:
    """Print one item; returns False if some part failed (the rest is still printed)."""
    ok = True
    print(_banner(f"{name} ({kind})"), file=out)
    if kind == "block_mask":
        print(obj, file=out)
        return ok
    try:
        attn = as_variant(kind, obj)  # traces plain functions: may fail with a DSLError
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=out)
        return False
    sections = [("IR", lambda: str(attn.ir))]
    L, S = args.len, args.kv_len or args.len
    sections.append((f"block map L={L} S={S}", lambda: _block_map(attn, L, S, args.device)))
    if args.source != "none":
        sections.append((f"{args.source} source", lambda: _source(attn, args.source, args.device)))
    for title, produce in sections:
        print(f"-- {title} --", file=out)
        try:
            print(produce(), file=out)
        except Exception as exc:  # keep going: show what can be shown
            ok = False
            print(f"error: {type(exc).__name__}: {exc}", file=out)
            if os.environ.get("ATTNFORGE_DEBUG"):
                traceback.print_exc(file=out)
    return ok


def _block_map(attn, L: int, S: int, device: str) -> str:
    bm = attn.block_mask(L, S, device=device)
    return "(no mask: every block is full)" if bm is None else str(bm)


def _source(attn, which: str, device: str) -> str:
    from attnforge.runtime import cache

    modules = attn.kernels(device)
    if which not in modules:
        return f"(no {which} kernel generated)"
    return f"# {modules[which].__file__}\n" + cache.source_of(modules[which])


# -- commands --


def cmd_inspect(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    items = find_variants(load_namespace(args.file))
    if args.name:
        items = [it for it in items if it[0] == args.name or it[0].startswith(args.name + "[")]
    if not items:
        print(f"no variants, mods or block masks found at module level in {args.file}", file=out)
        return 1
    results = [show(name, kind, obj, args, out) for name, kind, obj in items]
    return 0 if all(results) else 1


def cmd_knobs(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    from attnforge.runtime import knobs

    print(knobs.describe(), file=out)
    return 0


def cmd_cache(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    from attnforge.runtime import cache

    if args.clear:
        cache.cache_clear(disk=True)
        print(f"cleared this compiler's entries under {cache.cache_root()}", file=out)
    for field, value in cache.cache_info()._asdict().items():
        print(f"{field:<16} {value}", file=out)
    print(f"{'fingerprint':<16} {cache.compiler_fingerprint()}", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attnforge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect", help="show IR, block map and generated source of a file's variants"
    )
    p.add_argument("file", help="a Python file defining variants (e.g. examples/causal.py)")
    p.add_argument("--len", type=int, default=1024, help="query length for the block map")
    p.add_argument("--kv-len", type=int, default=None, help="key length (default: --len)")
    p.add_argument("--source", choices=("fwd", "bwd", "none"), default="fwd")
    p.add_argument("--device", default="cpu", help="device for block map and kernels")
    p.add_argument("--name", default=None, help="only the variant with this module-level name")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("knobs", help="list every ATTNFORGE_* environment variable")
    p.set_defaults(func=cmd_knobs)
    p = sub.add_parser("cache", help="kernel cache statistics")
    p.add_argument("--clear", action="store_true", help="delete this compiler's cache entries")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "inspect":
        for flag in ("len", "kv_len"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
