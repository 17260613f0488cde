"""Dead-engine detection for a multiprocess vLLM engine: is the engine-core process alive, and a watchdog
that wakes a call blocked on one that died (vLLM calls through ``vllm_compat``)."""
from __future__ import annotations

import contextlib
import threading

from rlhf_fast.rollout import vllm_compat as compat


def engine_alive(llm) -> bool:
    """False when an engine-core process has exited (a zombie counts as exited)."""
    import psutil
    for pid in compat.engine_core_pids(llm):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            return False
    return True


@contextlib.contextmanager
def dead_engine_watchdog(llm, poll_s: float = 0.2):
    """Wake a call that is blocked on an engine-core process that died during it.

    vLLM 0.32's synchronous multiprocess client waits without a timeout (``outputs_queue.get()`` for
    ``generate``, ``Future.result()`` for utility calls such as ``collective_rpc``); when the engine process
    dies mid-call, its own monitor shuts the output thread down without waking either waiter, so the call
    hangs. While the body runs, a thread polls the engine process and, once it is gone, fails both waits
    with ``EngineDeadError``. A no-op in-process (no engine-core process)."""
    outputs, pending = compat.sync_client_waiters(llm)
    if outputs is None or not compat.engine_core_pids(llm):
        yield
        return
    stop = threading.Event()

    def watch():
        while not stop.wait(poll_s):
            if not engine_alive(llm):
                outputs.put_nowait(compat.engine_dead_error())
                for future in list(pending.values()):
                    if not future.done():
                        future.set_exception(compat.engine_dead_error())
                return

    thread = threading.Thread(target=watch, name="rlhf_fast-engine-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
