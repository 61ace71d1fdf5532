"""Printing the case counts of the fuzz and differential suites past pytest's capture."""

from __future__ import annotations


def print_line(config, line: str) -> None:
    """Write `line` to the terminal even while pytest captures output."""
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if capture is None or reporter is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)
