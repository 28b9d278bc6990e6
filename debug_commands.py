# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""The hidden `debug` commands that the lifecycle tests (test_buckd.py) run in buckd, in
workload.py's form: name -> (usage, help, handler). Keep them when you replace the workload."""
import os
import time

import buck


def cmd_debug_sleep(call):
    """`buck debug sleep SECONDS`: one line, then a sleep that ends early if stopped."""
    seconds = buck.seconds(os.fsdecode(call.args[0]), "SECONDS", 0, buck.MAX_SECONDS)
    done = time.monotonic() + seconds
    yield "stdout", b"sleeping for %g s\n" % seconds
    call.stop.wait(done - time.monotonic())
    return 0 if time.monotonic() >= done else None


def cmd_debug_crash(call):
    """`buck debug crash`: a simulated bug in a command, hence a panic."""
    raise RuntimeError(f"`{buck.TOOL} debug crash` was invoked")
    yield                           # (a generator, like every command)


COMMANDS = {
    "debug sleep": ("SECONDS", None, cmd_debug_sleep),
    "debug crash": ("", None, cmd_debug_crash),
}
