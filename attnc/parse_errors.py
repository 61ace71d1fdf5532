"""The parser's diagnostics: what a syntax error says, and the checks on raw source text
that run before and beside the grammar.

input:  source text, a file name, lark's exception or the keyword tokens a parse lexed.
output: `Diagnostic`s (errors.error) with a span and, where a fix is known, a hint;
        the deepest bracket nesting of a source (`max_nesting`).
does not: parse (syntax.py runs the grammar and raises the `AttnError`) or build AST nodes.
"""

from __future__ import annotations

import re

import lark
from lark import Token

from .errors import Span, error, source_lines


def glued_keyword(source: str, file: str, keywords: list[Token]):
    """A diagnostic for the first keyword directly followed by a name character, or None."""
    for tok in keywords:
        end = tok.start_pos + len(tok)
        if end < len(source) and (source[end].isalnum() or source[end] == "_"):
            m = _WORD.match(source, tok.start_pos)
            word = m.group(0) if m else str(tok)
            span = Span(file=file, line=tok.line, col=tok.column, end_line=tok.line, end_col=tok.column + len(word))
            return error(span, f"missing space: the keyword '{tok}' runs into the name after it ('{word}')",
                         f"{tok} {word[len(str(tok)):]}")
    return None


# Friendly names for terminals in "expected ..." messages.
_TERMINAL_NAMES = {
    "LPAR": "'('", "RPAR": "')'", "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','", "EQUAL": "'='",
    "SEMICOLON": "';'", "COLON": "':'", "VBAR": "'|'", "AMPERSAND": "'&'", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "PERCENT": "'%'", "AT": "'@'", "DOT": "'.'", "TILDE": "'~'", "NAME": "a name",
    "INT": "an integer", "STRING": "a string", "CMP": "a comparison", "$END": "end of file",
    "PATTERN": "'pattern'", "LET": "'let'", "IMPORT": "'import'", "ON": "'on'", "IN": "'in'",
    "WHERE": "'where'", "HEADS": "'heads'",
}

_KNOWN_MISTAKES = [
    # (predicate on the offending token and the previous one, message, hint)
    (lambda tok, prev: tok.type == "EQUAL" and prev is not None and prev.type == "EQUAL",
     "'==' is a comparison; it is only allowed inside `where`", "where q == k"),
    (lambda tok, prev: str(tok) in {"&&", "||"} or (tok.type in {"AMPERSAND", "VBAR"} and prev is not None and prev.type == tok.type),
     "doubled operator: masks combine with a single '|' or '&'", "P | Q"),
]


def _describe_expected(expected: set[str]) -> str:
    names = sorted({_TERMINAL_NAMES.get(e, e.lower() if e.isupper() else repr(e)) for e in expected if not e.startswith("__")})
    if len(names) > 8:
        return ""
    return ", ".join(names)


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def max_nesting(source: str) -> tuple[int, tuple[int, int]]:
    """The deepest bracket nesting of the code (comments and strings do not count) and where it is."""
    depth = best = 0
    where = (1, 1)
    line, col = 1, 0
    skip_to = None  # inside a comment: "\n"; inside a string: '"' (strings end at the line too)
    for ch in source:
        col += 1
        if ch == "\n":
            line, col = line + 1, 0
            skip_to = None
        elif skip_to is not None:
            if ch == skip_to:
                skip_to = None
        elif ch == "#":
            skip_to = "\n"
        elif ch == '"':
            skip_to = '"'
        elif ch in "({":
            depth += 1
            if depth > best:
                best, where = depth, (line, col)
        elif ch in ")}":
            depth -= 1
    return best, where


def syntax_diagnostic(exc: lark.UnexpectedInput, source: str, file: str):
    line = getattr(exc, "line", 1) or 1
    col = getattr(exc, "column", 1) or 1
    if isinstance(exc, lark.UnexpectedToken) and exc.token.type == "$END":
        lines = source_lines(source)
        line = max((i + 1 for i, text in enumerate(lines) if text.strip()), default=1)
        col = len(lines[line - 1].rstrip()) + 1
        span = Span(file=file, line=line, col=col, end_line=line, end_col=col + 1)
        return error(span, "unexpected end of file: the last definition is incomplete")
    if isinstance(exc, lark.UnexpectedCharacters):
        ch = source[exc.pos_in_stream] if exc.pos_in_stream < len(source) else "?"
        span = Span(file=file, line=line, col=col, end_line=line, end_col=col + 1)
        if ch == '"':
            return error(span, "unterminated string: a string must end on the same line")
        if ch in "!=":
            return error(span, f"unexpected {ch!r}: comparisons are only allowed inside `where`",
                         "where q == k")
        if ch == "[":
            return error(span, "unexpected '[': use parentheses for tuples `(3, 5)` and braces for sets `{1, 2}`")
        return error(span, f"unexpected character {ch!r}")
    tok = exc.token
    span = Span(file=file, line=line, col=col, end_line=line, end_col=col + max(1, len(str(tok))))
    prev = None
    if getattr(exc, "token_history", None):
        prev = exc.token_history[-1]
    for pred, msg, hint in _KNOWN_MISTAKES:
        if pred(tok, prev):
            return error(span, msg, hint)
    if tok.type == "CMP":
        return error(span, f"comparison '{tok}' outside a condition: comparisons live inside `where`, "
                     "whose condition ends at '|', '&' and ')'",
                     "where q < k and k > 2    or    (where q < k) & causal")
    if tok.type == "NAME" and prev is not None and prev.type in {"NAME", "INT", "RPAR"}:
        return error(span, f"unexpected name {str(tok)!r}: missing an operator or a ',' before it?")
    expected = _describe_expected(set(getattr(exc, "expected", ()) or ()))
    what = f"unexpected {str(tok)!r}"
    return error(span, what + (f"; expected {expected}" if expected else ""))
