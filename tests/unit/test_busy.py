"""The busy-machine check counts CPU of processes outside our own tree, and only those."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from ampd_plugin.busy import BusySampler, foreign_usage

SPIN = [sys.executable, "-c", "import time\nt=time.time()+4\nwhile time.time()<t: pass"]


def test_a_process_outside_the_tree_is_counted():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(lambda: stop.is_set(), True)], daemon=True)
    try:
        spinner.start()  # this test process spins; seen from the sleeper's tree it is foreign
        usage = foreign_usage(1.0, root=sleeper.pid)
    finally:
        stop.set()
        spinner.join(5)
        sleeper.kill()
        sleeper.wait(5)
    assert usage.foreign_cores > 0.1  # a spinning thread; less than a core when the machine is loaded
    assert os.getpid() in [pid for _, pid, _ in usage.top]
    assert "cores used by other processes" in usage.describe()


def test_our_own_children_are_not_counted():
    child = subprocess.Popen(SPIN)
    try:
        time.sleep(0.2)
        usage = foreign_usage(1.0)
    finally:
        child.kill()
        child.wait(5)
    assert child.pid not in [pid for _, pid, _ in usage.top]


def test_sampler_records_windows():
    with BusySampler(period_s=0.1, window_s=0.2) as sampler:
        time.sleep(0.7)
    assert len(sampler.samples) >= 2 and sampler.worst is not None
