"""Run `sqsbalancerd` under cProfile in every thread, and merge the profiles at exit.

    python -m bench.profile_daemon OUT.prof run [sqsbalancerd run options]

`python -m cProfile` sees only the main thread, which in sqsbalancerd just waits for a
signal: the pollers, workers and the acknowledger run on threads the runtime starts. This
wraps threading.Thread.run so each thread gets its own profiler; the profiles of threads
that finished (the runtime joins them on drain) are added to the main thread's and dumped.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
from typing import Any

_finished: list[cProfile.Profile] = []
_lock = threading.Lock()
_original_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    profile = cProfile.Profile()
    profile.enable()
    try:
        _original_run(self)
    finally:
        profile.disable()
        with _lock:
            _finished.append(profile)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out, rest = args[0], args[1:]
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    from sqsbalancerd.cli import app

    main_profile = cProfile.Profile()
    code: Any = 0
    main_profile.enable()
    try:
        app(rest, prog_name="sqsbalancerd")
    except SystemExit as exc:
        code = exc.code
    finally:
        main_profile.disable()
        stats = pstats.Stats(main_profile)
        with _lock:
            for profile in _finished:
                stats.add(profile)
        stats.dump_stats(out)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
