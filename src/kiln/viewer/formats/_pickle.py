"""Pickles read as data: the opcode stream is decoded and replayed on a stack, nothing is imported or called.

``pickletools.genops`` decodes the opcodes; this module gives them their stack
meaning with inert stand-ins: a ``GLOBAL`` becomes a :class:`Global` naming the
class or function, ``REDUCE``/``NEWOBJ`` a :class:`Call` that records the
callee and its arguments (``BUILD`` stores the state on it), ``BINPERSID`` a
:class:`Persistent` holding the id.  Readers interpret the result against
closed tables (PyTorch's ``_rebuild_tensor_v2`` and storage type names).
Opcodes that would need code to run to mean anything (``INST``, ``OBJ``,
extension registry) are refused.
"""
from __future__ import annotations

import io
import pickletools
from typing import Any


class PickleError(ValueError):
    """The bytes are not a pickle this reader can replay as data."""


class Global:
    """A class or function named by the pickle (never imported)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"Global({self.qualname})"


class Call:
    """``func(*args)`` as recorded by REDUCE or NEWOBJ, with the state BUILD gave it."""

    def __init__(self, func: Any, args: Any) -> None:
        self.func, self.args, self.state = func, args, None

    def named(self, *qualnames: str) -> bool:
        return isinstance(self.func, Global) and self.func.qualname in qualnames


class Persistent:
    """A persistent id (PyTorch: a storage reference)."""

    def __init__(self, pid: Any) -> None:
        self.pid = pid


_MAX_OPS = 20_000_000
_PUSH_ARG = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT", "FLOAT", "BINUNICODE",
             "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES",
             "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_PUSH_CONST = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def loads(data: bytes) -> Any:
    """The object a pickle describes, built from inert stand-ins."""
    return load(io.BytesIO(data))


def load(stream: Any) -> Any:
    """The object of the pickle at ``stream``'s position (a file-like object); the stream is left after it."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        if not marks:
            raise PickleError("a pickle opcode needs a mark that is not there")
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def pop() -> Any:
        if not stack:
            raise PickleError("the pickle pops from an empty stack")
        return stack.pop()

    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(stream)):
            if n > _MAX_OPS:
                raise PickleError("the pickle has too many opcodes")
            name = op.name
            if name in _PUSH_ARG:
                stack.append(arg)
            elif name in _PUSH_CONST:
                stack.append(_PUSH_CONST[name])
            elif name in ("PROTO", "FRAME"):
                continue
            elif name == "STOP":
                return pop()
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "POP":
                pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1] if stack else pop())
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(Global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = pop(), pop()
                stack.append(Global(str(module), str(attr)))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = stack[-1] if stack else pop()
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else pop()
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                if int(arg) not in memo:
                    raise PickleError(f"the pickle reads memo slot {arg}, which was never written")
                stack.append(memo[int(arg)])
            elif name in ("EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET"):
                stack.append({"EMPTY_DICT": dict, "EMPTY_LIST": list, "EMPTY_TUPLE": tuple,
                              "EMPTY_SET": list}[name]())
            elif name in ("TUPLE", "LIST", "FROZENSET"):
                items = pop_mark()
                stack.append(items if name == "LIST" else tuple(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                if len(stack) < k:
                    raise PickleError("the pickle builds a tuple from an empty stack")
                items = tuple(stack[-k:])
                del stack[-k:]
                stack.append(items)
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2])))
            elif name in ("SETITEM", "SETITEMS"):
                items = [pop(), pop()][::-1] if name == "SETITEM" else pop_mark()
                target = stack[-1] if stack else None
                if isinstance(target, dict):
                    target.update(zip(items[::2], items[1::2]))
            elif name in ("APPEND", "APPENDS", "ADDITEMS"):
                items = [pop()] if name == "APPEND" else pop_mark()
                target = stack[-1] if stack else None
                if isinstance(target, list):
                    target.extend(items)
            elif name == "REDUCE":
                args = pop()
                func = pop()
                stack.append(_ordered_dict(args) if isinstance(func, Global) and
                             func.qualname == "collections.OrderedDict" else Call(func, args))
            elif name == "NEWOBJ":
                args = pop()
                stack.append(Call(pop(), args))
            elif name == "NEWOBJ_EX":
                pop()
                args = pop()
                stack.append(Call(pop(), args))
            elif name == "BUILD":
                state = pop()
                target = stack[-1] if stack else None
                if isinstance(target, Call):
                    target.state = state          # a dict's BUILD state holds attributes, not items: dropped
            elif name in ("BINPERSID", "PERSID"):
                stack.append(Persistent(pop() if name == "BINPERSID" else arg))
            else:
                raise PickleError(f"opcode {name} is not replayed as data")
    except PickleError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, EOFError, OverflowError, MemoryError,
            RecursionError) as exc:
        raise PickleError(f"the pickle is damaged ({type(exc).__name__}: {exc})") from None
    raise PickleError("the pickle ends without a STOP opcode")


def _ordered_dict(args: Any) -> dict | Call:
    """``OrderedDict()`` or ``OrderedDict([[key, value], ...])`` as the dict it builds (data, no call)."""
    if args == ():
        return {}
    if isinstance(args, tuple) and len(args) == 1 and isinstance(args[0], list) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in args[0]):
        return dict((k, v) for k, v in args[0])
    return Call(Global("collections", "OrderedDict"), args)
