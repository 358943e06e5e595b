"""The garbage collector pause around attempts: nested, shared by threads, and never
leaving the collector off (or turning on one its caller had turned off)."""

from __future__ import annotations

import gc
import threading

from dispatch_celery.delivery import gcpause


def test_the_collector_is_off_inside_and_back_on_after_the_outermost_pause() -> None:
    assert gc.isenabled()
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer attempt still runs
    assert gc.isenabled()


def test_an_exception_still_resumes_the_collector() -> None:
    try:
        with gcpause.paused():
            raise RuntimeError("attempt failed")
    except RuntimeError:
        pass
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_overlapping_attempts_in_threads_resume_it_when_the_last_one_ends() -> None:
    inside = threading.Barrier(3)
    release = threading.Event()

    def attempt() -> None:
        with gcpause.paused():
            inside.wait(timeout=10)
            release.wait(timeout=10)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(timeout=10)  # both attempts are under way
    assert not gc.isenabled()
    release.set()
    for t in threads:
        t.join(timeout=10)
    assert gc.isenabled()


def test_garbage_cycles_made_during_an_attempt_are_collected_after_it() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    gc.collect()
    before = sum(isinstance(o, Node) for o in gc.get_objects())
    with gcpause.paused():
        for _ in range(100):
            Node()  # unreachable cycles: only the collector frees them
    gc.collect()
    assert sum(isinstance(o, Node) for o in gc.get_objects()) == before
