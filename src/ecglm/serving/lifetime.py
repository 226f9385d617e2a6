"""Processes LitServe starts stop when the server's main process is gone (:func:`exit_with_parent`).

Its own module: both the HTTP side (:mod:`ecglm.serving.app`) and the inference workers
(:mod:`ecglm.serving.api`) call it, and neither imports the other.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time


def exit_with_parent(interval: float = 1.0, grace: float = 10.0) -> None:
    """In a process LitServe started (an HTTP server or an inference worker): when the server's main
    process is gone, stop the processes it had started (LitServe's multiprocessing manager among them)
    and this one, with SIGTERM (an HTTP server shuts down as uvicorn does: requests being read finish,
    their temporary folders removed), then for good after ``grace`` seconds. LitServe's own shutdown
    stops them; a main process that was killed (SIGKILL, out of memory) cannot, and they would hold
    the port and the model's memory. Nothing happens in a main process."""
    if multiprocessing.parent_process() is None:
        return
    import psutil

    parent = os.getppid()

    def watch() -> None:
        siblings: list[psutil.Process] = []
        while os.getppid() == parent:
            with contextlib.suppress(psutil.Error):
                siblings = [p for p in psutil.Process(parent).children() if p.pid != os.getpid()]
            time.sleep(interval)
        for sibling in siblings:  # psutil checks that each is still the process it listed
            with contextlib.suppress(psutil.Error):
                sibling.terminate()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        for sibling in siblings:
            with contextlib.suppress(psutil.Error):
                sibling.kill()
        os._exit(0)

    threading.Thread(target=watch, name="ecglm-exit-with-parent", daemon=True).start()
