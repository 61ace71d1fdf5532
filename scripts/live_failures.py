"""A pytest plugin for device runs (`-p live_failures`, scripts/ on sys.path): writes every
failing test's report to $LIVE_FAILURES the moment it arrives (under xdist too: workers
forward reports to the controller), so a stage cut short by its time limit still says
which tests failed and why (pytest prints its summary only at the end)."""

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("LIVE_FAILURES")
    if not path or not report.failed:
        return
    with open(path, "a") as f:
        f.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n\n")
