"""Diagnostics: source spans, error/warning records and `AttnError`.

input:  spans and messages from every layer.
output: `Diagnostic` records, `AttnError` and the located text a user reads.
does not: know the language or any pattern.

Every problem with `.attn` text or with binding a pattern is reported as an
`AttnError` whose message starts with ``FILE:LINE:COL`` and shows the source
line with a caret, so a person can act on it without reading a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """A source range; lines and columns are 1-based, end is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def source_lines(source: str) -> list[str]:
    """The lines of `source` as spans count them: split at "\n" only (the
    parser's rule), not at the other breaks `str.splitlines` knows (\r, \x0c,
    \u2028, ...), so line N of a span is line N here."""
    return [line.removesuffix("\r") for line in source.split("\n")]


NO_SPAN = Span(file="<builtin>", line=0, col=0, end_line=0, end_col=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnostic:
    span: Span
    message: str
    severity: str = "error"  # "error" | "warning" | "note"
    hint: str | None = None

    def render(self, source: str | None = None) -> str:
        head = f"{self.span}: {self.severity}: {self.message}"
        lines = [head]
        if source is not None and self.span.line > 0:
            src_lines = source_lines(source)
            if 0 < self.span.line <= len(src_lines):
                text = src_lines[self.span.line - 1].replace("\t", " ")
                width = 1
                if self.span.end_line == self.span.line and self.span.end_col > self.span.col:
                    width = self.span.end_col - self.span.col
                lines.append(f"    {text}")
                lines.append("    " + " " * (self.span.col - 1) + "^" + "~" * (width - 1))
        if self.hint:
            lines.append(f"    = try: {self.hint}")
        return "\n".join(lines)


class AttnError(Exception):
    """A diagnostic about `.attn` text or about binding a pattern.

    ``str(err)`` starts with ``FILE:LINE:COL: error: ...`` (the first
    diagnostic) and lists every diagnostic collected, each with its source line
    and a caret. ``err.diagnostics`` holds the structured records.
    """

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic, sources: dict[str, str] | None = None):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: tuple[Diagnostic, ...] = tuple(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(self.render())

    @property
    def span(self) -> Span:
        return self.diagnostics[0].span

    def render(self) -> str:
        return "\n".join(d.render(self.sources.get(d.span.file)) for d in self.diagnostics)

    def with_sources(self, sources: dict[str, str]) -> "AttnError":
        merged = {**sources, **self.sources}
        return type(self)(list(self.diagnostics), merged)


class SizeError(AttnError, ValueError):
    """A located diagnostic that depends on the sizes of a call (M, N, H, grid): a
    constraint such as `size * dilation <= length`, or a default that divides by zero
    at these sizes. Both an `AttnError` (it points at the text) and the `ValueError`
    the docs promise for bad sizes."""


def error(span: Span, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(span=span, message=message, severity="error", hint=hint)


class Collector:
    """Accumulates diagnostics so a whole file's errors are reported together."""

    def __init__(self) -> None:
        self.items: list[Diagnostic] = []

    def add(self, diag: Diagnostic) -> None:
        if diag not in self.items:
            self.items.append(diag)

    def extend(self, err: AttnError) -> None:
        for d in err.diagnostics:
            self.add(d)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    def raise_if_errors(self, sources: dict[str, str]) -> None:
        errs = self.errors
        if errs:
            errs = sorted(errs, key=lambda d: (d.span.file, d.span.line, d.span.col))
            raise AttnError(errs, sources)

