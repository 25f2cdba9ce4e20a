"""A crashed xdist worker costs the test it was running, not the run: pytest-xdist 3.8's group scheduler
(``--dist loadgroup``, which .ci/run uses to keep the HEAVY tests in one worker) can wait forever once it
has replaced a crashed worker, and once CI sat there until its time limit, the crashed test's name never
printed. Imported by tests/conftest.py; the hooks below run in the controlling pytest process.

What goes wrong upstream (pytest-xdist issues 1323, 1327 and 1378; the fixes there are not released):

- The crashed worker's whole workload goes back on the queue, finished groups included. A finished group
  is later sent to a worker as an empty list of tests, and an empty list never reports back, so each
  one swallows a chance to send more; at the end of the run every worker can be left waiting.
- The crashed test goes back on the queue too, so it can take the replacement down with it.
- A worker runs a test only once it has the next one (or the order to stop): a replacement given a
  single test, while the queue still holds more, waits for a second one that nothing sends.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from xdist.scheduler import LoadGroupScheduling


class CrashSafeLoadGroupScheduling(LoadGroupScheduling):
    """``--dist loadgroup``, less the three ways above of hanging after a worker crash."""

    def remove_node(self, node):
        workload = self.assigned_work.pop(node)
        pending = [(group, test) for group, tests in workload.items() for test, done in tests.items() if not done]
        if not pending:  # a normal shutdown
            return None
        group, crashed = pending[0]  # a worker runs its tests in order: the first unfinished one crashed it
        workload[group][crashed] = True  # reported failed by xdist; not run again
        self.registered_collections.pop(node, None)  # its replacement registers afresh
        for group, tests in workload.items():
            if not all(tests.values()):
                self.workqueue[group] = tests
        for other in self.nodes:
            self._reschedule(other)
        return crashed

    def _reschedule(self, node):
        try:
            if not node.shutting_down and self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
                self._assign_work_unit(node)
                while self.workqueue and self._pending_of(self.assigned_work[node]) < 2:
                    self._assign_work_unit(node)  # two tests at least, or it waits for a second
        except OSError:  # this worker is down too: its own remove_node requeues what it was given
            pass
        if not self.workqueue:  # nothing left to hand out: every worker finishes what it has, then stops
            for other in self.nodes:
                if not other.shutting_down:
                    try:
                        other.shutdown()
                    except OSError:
                        pass


@pytest.hookimpl(optionalhook=True)  # xdist's hooks: unknown where it is off (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        return CrashSafeLoadGroupScheduling(config, log)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """Say how a crashed worker ended (-9: SIGKILL, which is what the kernel's out-of-memory killer sends;
    -11: a segmentation fault, with faulthandler's traceback above), how much memory the machine has left,
    and what the kernel logged of killed processes, so that a crash in CI can be told apart without
    reproducing it."""
    if not error:
        return
    popen = getattr(getattr(node.gateway, "_io", None), "popen", None)  # execnet's worker process
    try:
        status = popen.wait(5)
    except Exception:  # noqa: BLE001 - a diagnostic must not hide the crash report itself
        status = "unknown"
    meminfo = Path("/proc/meminfo")
    available = next((line.split(":", 1)[1].strip() for line in meminfo.read_text().splitlines()
                      if line.startswith("MemAvailable:")), "unknown") if meminfo.exists() else "unknown"
    print(f"\n{node.gateway.id} ended with exit status {status}; memory available now: {available}", flush=True)
    try:
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return
    killed = [line for line in kernel if re.search(r"out of memory|oom-kill|killed process|segfault", line, re.I)]
    for line in killed[-5:]:
        print(f"kernel: {line}", flush=True)
