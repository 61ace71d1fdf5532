"""Parsing: `.attn` text -> lark tree -> AST.

input:  source text and a file name (for spans).
output: a `Module` of frozen AST nodes, every node with its `Span`.
does not: resolve names, check types or evaluate anything (see elaborate.py), or word
        syntax errors (parse_errors.py says what a syntax error says).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args

from .errors import AttnError, Span, error, source_lines
from .parse_errors import glued_keyword, max_nesting, syntax_diagnostic

# ----------------------------------------------------------------------------- AST nodes


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    span: Span = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Num(Node):
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Real(Node):
    """A decimal literal such as `0.5` (only score terms take non-integers)."""

    value: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Index(Node):
    """`table[i, j]`: an entry of a `table(...)` run-time input (score terms)."""

    base: str
    indices: tuple["Expr", ...]
    base_span: Span = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bool(Node):
    value: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Name(Node):
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Coord(Node):
    """`q.h` / `k.w`: a grid coordinate of the query or key token."""

    base: str
    axis: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Kwarg(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True, slots=True, kw_only=True)
class Call(Node):
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[Kwarg, ...]
    func_span: Span = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unary(Node):
    op: str  # "-" | "~" | "not"
    operand: "Expr"


@dataclass(frozen=True, slots=True, kw_only=True)
class Binary(Node):
    op: str  # "|" "&" "+" "-" "*" "//" "%" "**" "and" "or"
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True, slots=True, kw_only=True)
class Compare(Node):
    ops: tuple[str, ...]
    operands: tuple["Expr", ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class In(Node):
    item: "Expr"
    collection: "Expr"


@dataclass(frozen=True, slots=True, kw_only=True)
class Range(Node):
    start: "Expr"
    stop: "Expr"
    step: "Expr | None"


@dataclass(frozen=True, slots=True, kw_only=True)
class TupleLit(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SetLit(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Arm(Node):
    selector: "Expr | None"  # None for the wildcard `_`
    body: "Expr"


@dataclass(frozen=True, slots=True, kw_only=True)
class Heads(Node):
    arms: tuple[Arm, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Where(Node):
    pred: "Expr"


@dataclass(frozen=True, slots=True, kw_only=True)
class Along(Node):
    operand: "Expr"
    axis: str
    axis_span: Span = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class LetIn(Node):
    name: str
    value: "Expr"
    body: "Expr"


Expr = Num | Real | Index | Bool | Name | Coord | Call | Unary | Binary | Compare | In | Range | TupleLit | SetLit | Heads | Where | Along | LetIn


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeSpec(Node):
    name: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Param(Node):
    name: str
    default: Expr | None
    type: TypeSpec | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LayoutPart(Node):
    kind: str
    args: tuple[Expr, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout(Node):
    parts: tuple[LayoutPart, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Import(Node):
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Let(Node):
    name: str
    value: Expr
    name_span: Span = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class PatternDef(Node):
    name: str
    params: tuple[Param, ...]
    layout: Layout | None
    body: Expr
    description: str
    #: `score EXPR` after the mask: the logit of each allowed pair, or None (scale * q.k)
    score: Expr | None = None
    name_span: Span = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Module(Node):
    file: str
    items: tuple[Import | Let | PatternDef, ...]


# ----------------------------------------------------------------------------- limits

#: Inputs beyond these are rejected with a diagnostic instead of exhausting the
#: stack or memory (fuzzed inputs, generated files gone wrong).
MAX_SOURCE_CHARS = 1_000_000
MAX_NESTING = 200
#: Deepest expression tree one definition may have (operators, calls, `let
#: ... in`, brackets): a chain `a | b | c ...` is one level per operator.
#: Every pass walks expressions recursively (about 2 Python frames a level),
#: so this keeps them far from the interpreter's recursion limit.
MAX_EXPR_DEPTH = 200
#: Largest magnitude of any integer (literals, constants, bound values): the
#: evaluators add and multiply positions in int64 without overflow below it.
MAX_INT = 2**60


# ----------------------------------------------------------------------------- parser


#: keyword terminals (lark names anonymous string terminals after their text)
_KEYWORDS = ("IMPORT", "LET", "PATTERN", "ON", "IN", "STEP", "TRUE", "FALSE", "HEADS", "WHERE", "OR", "AND", "NOT",
             "SCORE")
_LEXED = threading.local()  # the keyword tokens of the parse running in this thread


def _note_keyword(tok: Token) -> Token:
    seen = getattr(_LEXED, "keywords", None)
    if seen is not None:
        seen.append(tok)
    return tok


@functools.cache
def _parser() -> Lark:
    text = resources.files("attnc.grammar").joinpath("attn.lark").read_text(encoding="utf-8")
    # The contextual lexer matches a keyword where only a keyword may come, even as the
    # start of a longer word (`ongrid` as `on grid`); the keyword tokens are recorded so
    # that parse() can refuse a keyword glued to the name after it.
    return Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=True,
                lexer_callbacks={k: _note_keyword for k in _KEYWORDS})


def _span(file: str, meta_or_tok) -> Span:
    if isinstance(meta_or_tok, Token):
        end_line = meta_or_tok.end_line or meta_or_tok.line
        end_col = meta_or_tok.end_column or (meta_or_tok.column + len(meta_or_tok))
        return Span(file=file, line=meta_or_tok.line, col=meta_or_tok.column, end_line=end_line, end_col=end_col)
    if getattr(meta_or_tok, "empty", True):
        return Span(file=file, line=0, col=0, end_line=0, end_col=0)
    return Span(
        file=file,
        line=meta_or_tok.line,
        col=meta_or_tok.column,
        end_line=meta_or_tok.end_line,
        end_col=meta_or_tok.end_column,
    )


@v_args(meta=True)
class _ToAst(Transformer):
    """One method per grammar alias; each builds one AST node with its span."""

    def __init__(self, file: str, source: str):
        super().__init__()
        self.file = file
        self.lines = source_lines(source)

    def s(self, meta) -> Span:
        return _span(self.file, meta)

    # -- items
    def start(self, meta, items):
        return Module(span=self.s(meta), file=self.file, items=tuple(items))

    def import_stmt(self, meta, ch):
        return Import(span=self.s(meta), path=str(ch[0])[1:-1])

    def let_stmt(self, meta, ch):
        name, value = ch
        return Let(span=self.s(meta), name=str(name), value=value, name_span=_span(self.file, name))

    def pattern_def(self, meta, ch):
        name, params, layout, body, score = ch
        return PatternDef(
            span=self.s(meta),
            name=str(name),
            params=tuple(params or ()),
            layout=layout,
            body=body,
            score=score,
            description=self._description(meta.line),
            name_span=_span(self.file, name),
        )

    def score_clause(self, meta, ch):
        return ch[0]

    def _description(self, line: int) -> str:
        """The comment block directly above line `line` (1-based)."""
        out: list[str] = []
        i = line - 2
        while i >= 0 and self.lines[i].lstrip().startswith("#"):
            out.append(self.lines[i].lstrip()[1:].strip())
            i -= 1
        return " ".join(reversed(out)).strip()

    def param_list(self, meta, ch):
        return [c for c in ch if c is not None]

    def param_value(self, meta, ch):
        return Param(span=self.s(meta), name=str(ch[0]), default=ch[1], type=None)

    def param_typed(self, meta, ch):
        name, tname, targs = ch
        tspan = _span(self.file, tname)
        return Param(
            span=self.s(meta), name=str(name), default=None,
            type=TypeSpec(span=tspan, name=str(tname), args=tuple(targs or ())),
        )

    def param_required(self, meta, ch):
        return Param(span=self.s(meta), name=str(ch[0]), default=None, type=None)

    def type_args(self, meta, ch):
        return [c for c in ch if c is not None]

    def layout(self, meta, ch):
        return Layout(span=self.s(meta), parts=tuple(ch))

    def layout_part(self, meta, ch):
        name, *args = ch
        return LayoutPart(span=self.s(meta), kind=str(name), args=tuple(a for a in args if a is not None))

    # -- expressions
    def let_in(self, meta, ch):
        return LetIn(span=self.s(meta), name=str(ch[0]), value=ch[1], body=ch[2])

    def _bin(op):  # noqa: N805 - helper building transformer methods
        def method(self, meta, ch):
            return Binary(span=self.s(meta), op=op, left=ch[0], right=ch[1])
        return method

    union = _bin("|")
    inter = _bin("&")
    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    floordiv = _bin("//")
    mod = _bin("%")
    pow = _bin("**")
    truediv = _bin("/")
    or_ = _bin("or")
    and_ = _bin("and")

    def range_(self, meta, ch):
        return Range(span=self.s(meta), start=ch[0], stop=ch[1], step=ch[2])

    def neg(self, meta, ch):
        return Unary(span=self.s(meta), op="-", operand=ch[0])

    def complement(self, meta, ch):
        return Unary(span=self.s(meta), op="~", operand=ch[0])

    def not_(self, meta, ch):
        return Unary(span=self.s(meta), op="not", operand=ch[0])

    def along(self, meta, ch):
        return Along(span=self.s(meta), operand=ch[0], axis=str(ch[1]), axis_span=_span(self.file, ch[1]))

    def number(self, meta, ch):
        text = str(ch[0])
        # int() of a 5000-digit literal raises; anything past 19 digits is past MAX_INT anyway
        value = int(text) if len(text) <= 19 else None
        if value is None or value > MAX_INT:
            shown = text if len(text) <= 24 else f"{text[:10]}...{text[-4:]} ({len(text)} digits)"
            raise AttnError(error(self.s(meta), f"integer literal {shown} is too large (limit 2**60 = {MAX_INT})"))
        return Num(span=self.s(meta), value=value)

    def real(self, meta, ch):
        return Real(span=self.s(meta), value=float(str(ch[0])))

    def index(self, meta, ch):
        base, *idx = ch
        return Index(span=self.s(meta), base=str(base), indices=tuple(idx), base_span=_span(self.file, base))

    def true(self, meta, ch):
        return Bool(span=self.s(meta), value=True)

    def false(self, meta, ch):
        return Bool(span=self.s(meta), value=False)

    def name(self, meta, ch):
        return Name(span=self.s(meta), id=str(ch[0]))

    def coord(self, meta, ch):
        return Coord(span=self.s(meta), base=str(ch[0]), axis=str(ch[1]))

    def call(self, meta, ch):
        func, *args = ch
        pos = tuple(a for a in args if a is not None and not isinstance(a, Kwarg))
        kws = tuple(a for a in args if isinstance(a, Kwarg))
        return Call(span=self.s(meta), func=str(func), args=pos, kwargs=kws, func_span=_span(self.file, func))

    def kwarg(self, meta, ch):
        return Kwarg(span=self.s(meta), name=str(ch[0]), value=ch[1])

    def tuple(self, meta, ch):
        return TupleLit(span=self.s(meta), items=tuple(c for c in ch if c is not None))

    def set_lit(self, meta, ch):
        return SetLit(span=self.s(meta), items=tuple(c for c in ch if c is not None))

    def heads(self, meta, ch):
        return Heads(span=self.s(meta), arms=tuple(ch))

    def arm(self, meta, ch):
        sel, body = ch
        if isinstance(sel, Name) and sel.id == "_":
            sel = None
        return Arm(span=self.s(meta), selector=sel, body=body)

    def where(self, meta, ch):
        return Where(span=self.s(meta), pred=ch[0])

    def compare(self, meta, ch):
        operands = tuple(c for c in ch if not isinstance(c, Token))
        ops = tuple(str(c) for c in ch if isinstance(c, Token))
        return Compare(span=self.s(meta), ops=ops, operands=operands)

    def in_(self, meta, ch):
        return In(span=self.s(meta), item=ch[0], collection=ch[1])


def parse(source: str, file: str = "<string>") -> Module:
    """Parse `.attn` text into a `Module`; raise `AttnError` on a syntax error."""
    if len(source) > MAX_SOURCE_CHARS:
        raise AttnError(
            error(Span(file=file, line=1, col=1, end_line=1, end_col=2),
                  f"file too large: {len(source)} characters (limit {MAX_SOURCE_CHARS})"),
            {file: source},
        )
    depth = max_nesting(source)
    if depth[0] > MAX_NESTING:
        line, col = depth[1]
        raise AttnError(
            error(Span(file=file, line=line, col=col, end_line=line, end_col=col + 1),
                  f"expression nested too deeply (more than {MAX_NESTING} levels of brackets)"),
            {file: source},
        )
    _LEXED.keywords = keywords = []
    try:
        tree = _parser().parse(source)
    except lark.UnexpectedInput as exc:
        raise AttnError(glued_keyword(source, file, keywords) or syntax_diagnostic(exc, source, file),
                        {file: source}) from None
    finally:
        _LEXED.keywords = None
    glued = glued_keyword(source, file, keywords)
    if glued is not None:
        raise AttnError(glued, {file: source})
    deep = _too_deep(tree)
    if deep is not None:
        raise AttnError(
            error(_span(file, deep.meta),
                  f"expression too deep: more than {MAX_EXPR_DEPTH} nested operators, calls or `let ... in` "
                  "(a chain `a | b | c ...` counts one level per operator)",
                  "split it into `let` definitions of at most a few dozen terms each"),
            {file: source},
        )
    try:
        return _ToAst(file, source).transform(tree)
    except lark.exceptions.VisitError as exc:  # a diagnostic raised while building a node
        if isinstance(exc.orig_exc, AttnError):
            raise exc.orig_exc.with_sources({file: source}) from None
        raise


def _too_deep(tree: lark.Tree) -> lark.Tree | None:
    """The first subtree deeper than MAX_EXPR_DEPTH, found without recursion."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_EXPR_DEPTH:
            return node
        # leftmost first, so a long chain `a | b | ...` is reported where it starts
        stack.extend((c, depth + 1) for c in reversed(node.children) if isinstance(c, lark.Tree))
    return None
