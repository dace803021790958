"""migchain-extender with every bind arriving late, as a loaded scheduler or extender makes some; e2e tests only.

Run as `python -m tests.e2e.late_binds ARGS` (the arguments of
`migchain-extender`). kube-scheduler filters and prioritizes the next pod
while the bind of the one before is on its way; when that bind reaches
migchain after them, both pods were sent for the same free slice. That
happens now and then on a busy machine; a fixed delay before each bind makes it
happen in every burst, so a test can rely on it. Nothing else changes.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from extender import serve
from extender.kube.binder import Binder

LATE_SECONDS = 0.05  # kube-scheduler filters and prioritizes a pod in 10 to 20 ms here


def main() -> int:
    bind = Binder.bind

    def late(self: Binder, args: Any) -> Any:
        time.sleep(LATE_SECONDS)
        return bind(self, args)

    Binder.bind = late  # type: ignore[method-assign]  # gunicorn forks its worker after this: it inherits it
    return serve.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
