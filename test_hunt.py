# SPDX-License-Identifier: MIT OR Apache-2.0. buckd's own test file (not vendored).
"""Issue 20's points, each as a real-process test that fails before the behaviour is built.

"Done means: each point above has a test that fails on today's main." Every test drives real
`buck.py` clients and a real buckd in a HOME of its own (test_buckd's Sandbox), reads every
name (files, env vars, the tool's name) from buck.py, and uses only the built-in commands and
the hidden `debug` ones, except the one test of the workload's digest cache (last section).
No sleep synchronises: we poll with deadlines; where a test checks that something does NOT
happen it gives it a bounded window, said in the test.
"""
import errno
import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_buckd import (BUCK, HERE, PY, Sandbox, alive, cmdline, dir_of, finish, lock_holder,  # noqa: F401
                        result, state, stopped, wait_for)
from test_buckd import repos, sb, spawning_buck  # noqa: F401  (fixtures, seen by pytest by name)

sys.path.insert(0, str(HERE))
import buck  # noqa: E402
import buckd  # noqa: E402

IDLE, CHECK = buck.IDLE_TIMEOUT_ENV, buck.CHECK_INTERVAL_ENV
PREFIX = f"{buck.TOOL}: "


def one_line(r):
    """Failed in one line `buck: ...`: besides the usual notice that a client starts buckd, one
    line says it (a dead daemon's log may follow, quoted "  | "). Returns that line."""
    notices = tuple(f"{PREFIX}{verb} {buck.DAEMON}: " for verb in ("starting", "restarting"))
    said = [line for line in r.err.splitlines()
            if not line.startswith("  | ") and not line.startswith(notices)]
    assert "Traceback" not in r.err, r.err
    assert len(said) == 1 and said[0].startswith(PREFIX), r.err
    return said[0]


def no_traceback(r):
    assert "Traceback" not in r.err, r.err
    return True


def info_of(d):
    return json.loads((Path(d) / buck.INFO_FILE).read_text())


def status_json(sb, cwd=None, env=None):
    r = sb.buck("status", "--json", cwd=cwd, env=env)
    assert r.code == 0 and no_traceback(r), r.err
    return json.loads(r.out)


@pytest.fixture
def helpers():
    """start(code): a python helper process running `code`; each killed by pid at teardown."""
    procs = []

    def start(code, **kw):
        proc = subprocess.Popen([PY, "-c", code], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, **kw)
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def lock_helper(helpers, path, how="lockf", then_stop=False, text=None):
    """A process that locks `path` (lockf: a POSIX lock; flock), says "locked", then waits
    (or SIGSTOPs itself). Returns it once it holds the lock."""
    code = (f"import fcntl, os, signal, sys\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
            f"fcntl.{how}(fd, fcntl.LOCK_EX)\n"
            + (f"os.ftruncate(fd, 0); os.write(fd, {text!r}.encode())\n" if text else "")
            + "print('locked', flush=True)\n"
            + ("os.kill(os.getpid(), signal.SIGSTOP)\n" if then_stop else "")
            + "signal.pause()\n")
    proc = helpers(code)
    assert proc.stdout.readline() == b"locked\n"
    if then_stop:
        wait_for(lambda: stopped(proc.pid), what="the helper to stop itself")
    return proc


# --- 1. Only a command is use

def test_status_calls_are_not_use_buckd_idles_out_under_them(sb):
    """Issue 20, 1: "Only a command is use." With BUCKD_IDLE_TIMEOUT=2, `status`, `status --all`
    and `server` in a loop must not keep buckd alive: it exits by itself, idle, within 12 s."""
    env = {IDLE: "2"}
    r = sb.buck("server", "--json", env=env)
    assert r.code == 0, r.err
    pid = json.loads(r.out)["pid"]
    deadline = time.monotonic() + 12
    while alive(pid) and time.monotonic() < deadline:
        for args in (("status",), ("status", "--all"), ("server",)):
            if not alive(pid):
                break
            sb.buck(*args, env=env)
    assert not alive(pid), "buckd kept running for 12 s under status calls alone (idle timeout 2 s)"


def test_idle_counts_from_the_end_of_the_last_command(sb):
    """Issue 20, 1 (and mutant ii): "a command longer than the idle timeout ... must leave buckd
    alive right after it ends": idle counts from the end of the last command."""
    env = {IDLE: "1.5"}
    r = sb.buck("debug", "sleep", "3", env=env)
    assert r.code == 0, r.err
    pid = sb.info()["pid"]
    wait_for(lambda: not alive(pid), timeout=15, what="buckd to idle out")
    steps = {(l["pid"], l["step"]): l["t"] for l in sb.lines()}
    accepted, ended = steps[(r.pid, "command")], steps[(pid, "daemon.shutdown")]
    assert ended >= accepted + 3 + 1.5 - 0.05, (accepted, ended)    # (load cannot make it early)


def test_a_command_in_flight_is_never_cut_by_the_idle_timeout(sb):
    """Issue 20, 1: "a command in flight is never cut (`debug sleep 3` with idle 1 finishes
    with exit 0)"."""
    r = sb.buck("debug", "sleep", "3", env={IDLE: "1"})
    assert (r.code, r.out) == (0, "sleeping for 3 s\n"), r.err


# --- 2. Settings take effect, and are said

def test_status_says_the_settings(sb):
    """Issue 20, 2: "`status --json` gains `idle_timeout_s` (float; 0 means never) and
    `check_interval_s`. Text `status` shows them too"."""
    env = {IDLE: "100", CHECK: "0.2"}
    assert sb.buck("server", env=env).code == 0
    s = status_json(sb, env=env)
    assert (s.get("idle_timeout_s"), s.get("check_interval_s")) == (100.0, 0.2), s
    text = sb.buck("status", env=env).out
    idle = [l for l in text.splitlines() if "idle timeout" in l.replace("_", " ")]
    check = [l for l in text.splitlines() if "check interval" in l.replace("_", " ")]
    assert idle and "100" in idle[0] and check and "0.2" in check[0], text
    sb.buck("kill")
    assert sb.buck("server", env={IDLE: "0"}).code == 0
    assert status_json(sb, env={IDLE: "0"}).get("idle_timeout_s") == 0, "idle timeout 0 (never)"


@pytest.mark.parametrize("name, old, new", [(IDLE, "100", "2"), (CHECK, "0.2", "0.5")])
def test_a_client_setting_another_value_applies_it_live_and_says_so(sb, name, old, new):
    """Issue 20, 2: "A client that SETS BUCKD_IDLE_TIMEOUT (or CHECK_INTERVAL) differently from
    the running buckd's applies it LIVE to that buckd (no restart: same pid afterwards) and says
    so in ONE stderr line containing the env var name, the old value and the new value";
    `status --json` shows the new value; it takes effect; the lifecycle log has a "settings"
    step."""
    base = {IDLE: "100", CHECK: "0.2"}
    r = sb.buck("server", "--json", env=base)
    assert r.code == 0, r.err
    pid = json.loads(r.out)["pid"]
    r = sb.buck("server", "--json", env={**base, name: new})
    assert r.code == 0 and no_traceback(r), r.err
    assert json.loads(r.out)["pid"] == pid, "restarted instead of applying the setting live"
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and name in lines[0], r.err
    assert re.search(rf"\b{re.escape(old)}\b.*\b{re.escape(new)}\b", lines[0]), lines[0]
    field = "idle_timeout_s" if name == IDLE else "check_interval_s"
    assert json.loads(r.out)[field] == float(new), r.out        # (buckd may idle out at once:
    if name == CHECK:                                           # no command ran for > 2 s)
        s = status_json(sb, env={IDLE: None, CHECK: None})      # (a client that sets nothing)
        assert s["pid"] == pid and s.get(field) == float(new), s
    assert any(l["step"] == "settings" for l in sb.lines()), "no lifecycle step 'settings'"
    if name == IDLE:                # idle 2: unused, buckd exits within ~6 s
        wait_for(lambda: not alive(pid), timeout=8, what="buckd to idle out after idle 2 applied")


def test_a_client_that_sets_nothing_changes_nothing(sb):
    """Issue 20, 2: "A client that sets nothing says nothing and changes nothing (alternate
    shells with and without the var: no restart, no ping-pong)"."""
    r = sb.buck("server", "--json", env={IDLE: "100"})
    pid = json.loads(r.out)["pid"]
    for i in range(6):
        r = sb.buck("server", "--json", env={IDLE: "100" if i % 2 else None})
        assert (r.code, r.err) == (0, "") and json.loads(r.out)["pid"] == pid, r.err
    s = status_json(sb, env={IDLE: None})
    assert s["pid"] == pid and s.get("idle_timeout_s") == 100.0, s


def test_a_nested_client_says_but_does_not_change_settings(sb):
    """Issue 20, 2: "A nested client (env has BUCKD_INSTANCE equal to the running buckd's mark)
    that sets a different value: one stderr line, the setting is NOT changed, exit code of its
    command unaffected"."""
    r = sb.buck("server", env={IDLE: "100"})
    info = sb.info()
    nested = {buck.INSTANCE_ENV: buckd.instance(info["pid"], info["start_time"]), IDLE: "50"}
    for args in (("server",), ("debug", "sleep", "0")):
        r = sb.buck(*args, env=nested)
        assert r.code == 0 and no_traceback(r), r.err
        lines = r.err.splitlines()
        assert len(lines) == 1 and IDLE in lines[0] and "50" in lines[0], r.err
    s = status_json(sb, env={IDLE: None})
    assert s["pid"] == info["pid"] and s.get("idle_timeout_s") == 100.0, s


# --- 3. killall in one pass, bounded

def test_killall_is_bounded_kills_the_wedged_and_spares_a_locked_dir(sb, repos):
    """Issue 20, 3: "killall in one pass, bounded": with one SIGSTOPped buckd and another dir
    whose lifecycle.lock a stopped client holds, `killall` finishes within 15 s (bound: ~10 s),
    kills the SIGSTOPped buckd, leaves the locked dir's buckd RUNNING, names that dir and the
    holder on stderr, and exits 1 (mutant i: exit 0 when a buckd could not be stopped)."""
    held = repos("held")
    assert sb.buck("server").code == 0
    assert sb.buck("server", cwd=held).code == 0
    wedged, spared = sb.info()["pid"], info_of(dir_of(sb, held))["pid"]
    os.kill(wedged, signal.SIGSTOP)
    holder = sb.spawn("kill", cwd=held, env={buck.STOP_AT_ENV: "restart.1"})
    try:
        wait_for(lambda: stopped(holder.pid), what="the client to stop holding lifecycle.lock")
        start = time.monotonic()
        r = sb.buck("killall", cwd=sb.tmp, timeout=120)
        took = time.monotonic() - start
        assert took < 15, f"killall took {took:.0f} s"
        assert r.code == 1 and no_traceback(r), (r.code, r.err)
        wait_for(lambda: not alive(wedged), timeout=5, what="the SIGSTOPped buckd to be gone")
        assert alive(spared) and not stopped(spared), "killed a buckd whose lifecycle.lock another holds"
        named = [l for l in r.err.splitlines() if str(dir_of(sb, held)) in l]
        assert named and f"pid {holder.pid}" in named[0], r.err
    finally:
        finish(sb, holder)


def test_killall_through_many_stale_dirs_is_bounded(sb, helpers):
    """Issue 20, 3: "300 empty daemon dirs (stale buckd.pid files, nothing locked) under the
    daemons' home plus one live buckd: killall kills it, exits 0, within 15 s". The stale
    files name a live process of someone else's: it is never signalled."""
    bystander = helpers("import signal; print('locked', flush=True); signal.pause()")
    assert bystander.stdout.readline() == b"locked\n"
    assert sb.buck("server").code == 0
    pid = sb.info()["pid"]
    home = sb.home / buck.STATE_DIR / buck.DAEMON
    for i in range(300):
        d = home / "stale" / f"r{i}" / "v2"
        d.mkdir(parents=True)
        (d / buck.PID_FILE).write_text(f"{bystander.pid}\n")
    start = time.monotonic()
    r = sb.buck("killall", cwd=sb.tmp, timeout=120)
    took = time.monotonic() - start
    assert (r.code, took < 15) == (0, True), (r.code, took, r.err)
    assert not alive(pid) and alive(bystander.pid) and not stopped(bystander.pid)


# --- 4. status shows what runs

def test_status_shows_the_running_commands_and_the_process(sb):
    """Issue 20, 4: "status shows what runs": `commands` (args, client_pid, running_s),
    rss_bytes, peak_rss_bytes, cpu_s; text `status` shows the words, the client pid, "up N s"
    durations (no raw floats) and the start as a local date-time; `status --all` the count."""
    client = sb.spawn("debug", "sleep", "30")
    try:
        assert client.stdout.readline() == b"sleeping for 30 s\n"
        s = status_json(sb)
        commands = s.get("commands")
        assert isinstance(commands, list) and len(commands) == 1, s
        c = commands[0]
        assert c.get("args") == ["debug", "sleep", "30"], c
        assert c.get("client_pid") == client.pid, c
        assert isinstance(c.get("running_s"), (int, float)) and c["running_s"] >= 0, c
        assert s.get("rss_bytes", 0) > 0 and s.get("peak_rss_bytes", -1) >= s["rss_bytes"], s
        assert isinstance(s.get("cpu_s"), (int, float)) and s["cpu_s"] >= 0, s
        text = sb.buck("status").out
        assert "debug sleep 30" in text and str(client.pid) in text, text
        assert not re.search(r"\d+\.\d{3,}", text), f"raw floats in:\n{text}"
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text), f"no local start time in:\n{text}"
        line = sb.buck("status", "--all", cwd=sb.tmp).out
        assert "1 running" in line or "debug sleep 30" in line, line
    finally:
        client.kill()
        client.communicate()


def test_status_shows_a_commands_words_escaped(sb, spawning_buck):
    """Issue 20, 4: a control character in a running command's argument is shown escaped by
    text `status` (`debug run`, spawning_buck's, is the one command taking any words)."""
    weird, pid_file = "\x1b[31m", sb.tmp / "child.pid"
    assert sb.buck("server", script=spawning_buck).code == 0
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    client = sb.spawn("debug", "run", "--", PY, "-c", child, weird, script=spawning_buck)
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the command to run")
        s = status_json(sb)
        assert isinstance(s.get("commands"), list) and weird in s["commands"][0].get("args", []), s
        text = sb.buck("status").out
        assert "\x1b" not in text and "\\x1b[31m" in text, text
    finally:
        client.kill()
        client.communicate()
        if pid_file.exists() and pid_file.read_text():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        sb.buck("kill", script=spawning_buck)


# --- 5a. Symlinks planted in the daemon dir are not followed; dirs of another owner refused

def test_a_symlinked_lifecycle_lock_never_writes_its_target(sb):
    """Issue 20, 5a: "`lifecycle.lock` a symlink to a file outside ... running `server` must
    not truncate/modify the victim"."""
    victim = sb.tmp / "victim"
    victim.write_text("precious")
    sb.dir().mkdir(parents=True)
    (sb.dir() / buck.LOCK_FILE).symlink_to(victim)
    r = sb.buck("server")
    assert no_traceback(r)
    assert victim.read_text() == "precious", f"the symlink's target was written: {victim.read_text()!r}"


@pytest.mark.parametrize("command", ["kill", "server"])
def test_a_symlinked_pid_file_never_gets_another_process_signalled(sb, helpers, command):
    """Issue 20, 5a: "`buckd.pid` a symlink to a file on which ANOTHER process holds a POSIX
    lock → `kill` and `server` must never signal that process"."""
    target = sb.tmp / "someone-elses.lock"
    proc = lock_helper(helpers, target)
    old = time.time() - 600             # (not "a buckd starting a moment ago")
    os.utime(target, (old, old))
    sb.dir().mkdir(parents=True)
    (sb.dir() / buck.PID_FILE).symlink_to(target)
    r = sb.buck(command, timeout=120)
    assert no_traceback(r)
    assert alive(proc.pid) and not stopped(proc.pid), f"`{command}` signalled pid {proc.pid}: {r.err}"


@pytest.mark.parametrize("which", ["daemon dir", "state dir"])
def test_a_dir_owned_by_another_user_is_refused(sb, which):
    """Issue 20, 5a: "A daemon dir (or a dir on the way to it under $HOME/.buck) owned by
    another uid: the client refuses in one line (stderr one line starting `buck: `, exit 1,
    no traceback)"."""
    sb.dir().mkdir(parents=True)
    os.chown(sb.dir() if which == "daemon dir" else sb.home / buck.STATE_DIR, 12345, 12345)
    r = sb.buck("server")
    assert r.code == 1 and one_line(r), (r.code, r.err)


# --- 5b. Odd buckd.end records

@pytest.mark.parametrize("record", [
    '{"pid": 123, "how": "kill"}',
    json.dumps({"pid": 123, "how": "kill", "why": "\ud800"})])
@pytest.mark.parametrize("args", [("status",), ("status", "--all"), ("server",)])
def test_odd_end_records_break_nothing(sb, record, args):
    """Issue 20, 5b: "`buckd.end` containing {"pid": 123, "how": "kill"} (no "why"), or ...
    "why": "\\ud800" (a lone surrogate escape): `status`, `status --all` and `server` all work
    (exit 0, no traceback)"."""
    sb.dir().mkdir(parents=True)
    (sb.dir() / buck.END_FILE).write_text(record)
    (sb.dir() / buck.PID_FILE).write_text("")      # (listed by status --all)
    r = sb.buck(*args, cwd=sb.tmp if "--all" in args else None)
    assert r.code == 0 and no_traceback(r), (r.code, r.err)


# --- 5c. The nested guard without a readable buckd.info

@pytest.mark.parametrize("info", ["missing", "corrupt"])
@pytest.mark.parametrize("command", ["killall", "server"])
def test_the_nested_guard_holds_without_buckd_info(sb, info, command):
    """Issue 20, 5c: "The nested guard with buckd.info missing or corrupt: a nested client ...
    the live buckd must NOT be killed (same pid alive), and the client must not say "no buckd
    was running"."""
    env = {CHECK: "100"}                # (buckd's self-check stays out of it)
    assert sb.buck("server", env=env).code == 0
    live = sb.info()
    nested = {**env, buck.INSTANCE_ENV: buckd.instance(live["pid"], live["start_time"])}
    if info == "missing":
        (sb.dir() / buck.INFO_FILE).unlink()
    else:
        (sb.dir() / buck.INFO_FILE).write_text("{not json")
    r = sb.buck(command, env=nested, cwd=sb.tmp if command == "killall" else None)
    assert no_traceback(r)
    assert alive(live["pid"]) and sb.holder() == live["pid"], f"the nested client killed its buckd: {r.err}"
    assert f"no {buck.DAEMON} was running" not in r.err, r.err


# --- 5d. A buckd.end that is a directory, a prev/ that is a file

@pytest.mark.parametrize("odd", ["end is a directory", "prev is a file"])
def test_buckd_starts_despite_odd_end_and_prev(sb, odd):
    """Issue 20, 5d: "`buckd.end` that is a directory ... and an unwritable/not-a-directory
    `prev/` ...: `server` still starts buckd (exit 0) — twice in a row (the second start
    after `kill`)"."""
    assert sb.buck("server").code == 0 and sb.buck("kill").code == 0
    d = sb.dir()
    if odd == "end is a directory":
        (d / buck.END_FILE).unlink()
        (d / buck.END_FILE).mkdir()
        (d / buck.END_FILE / "x").write_text("")
    else:
        import shutil
        shutil.rmtree(d / buck.PREV_DIR)
        (d / buck.PREV_DIR).write_text("not a directory")
    for _ in range(2):
        r = sb.buck("server", "--json")
        assert r.code == 0 and no_traceback(r), r.err
        pid = json.loads(r.out)["pid"]
        assert alive(pid) and sb.buck("kill").code == 0


# --- 5e. Finding every buckd under the daemons' home

def test_killall_and_status_all_find_a_buckd_through_a_symlinked_folder(sb):
    """Issue 20, 5e: "status --all/killall find a buckd whose daemon dir is unreadable" — as
    root no permission stops a walk, so (as the issue allows) the buckd's dir is reached
    through a symlinked folder under the daemons' home, which os.walk does not enter."""
    home = sb.home / buck.STATE_DIR / buck.DAEMON
    first = str(sb.repo).lstrip("/").split("/")[0]
    (sb.tmp / "elsewhere").mkdir()
    home.mkdir(parents=True)
    (home / first).symlink_to(sb.tmp / "elsewhere")
    assert sb.buck("server").code == 0
    pid = sb.info()["pid"]
    r = sb.buck("status", "--all", "--json", cwd=sb.tmp)
    assert r.code == 0 and pid in [row["pid"] for row in json.loads(r.out)], r.out
    r = sb.buck("killall", cwd=sb.tmp)
    assert r.code == 0 and no_traceback(r), r.err
    wait_for(lambda: not alive(pid), timeout=10, what="killall to kill the buckd")


def test_a_deep_tree_under_the_daemons_home_breaks_nothing(sb):
    """Issue 20, 5e: "a ~1,000-deep tree under the daemons' home: no RecursionError traceback,
    killall still kills the real buckd and exits 0"."""
    deep = sb.home / buck.STATE_DIR / buck.DAEMON / "deep"
    deep.mkdir(parents=True)
    fd = os.open(deep, os.O_RDONLY)
    try:
        for _ in range(1000):           # (relative to an fd: the full path is long)
            os.mkdir("d", dir_fd=fd)
            fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
    finally:
        os.close(fd)
    try:
        assert sb.buck("server").code == 0
        pid = sb.info()["pid"]
        r = sb.buck("status", "--all", cwd=sb.tmp)
        assert r.code == 0 and no_traceback(r), r.err[-2000:]
        r = sb.buck("killall", cwd=sb.tmp)
        assert r.code == 0 and no_traceback(r), r.err[-2000:]
        wait_for(lambda: not alive(pid), timeout=10, what="killall to kill the buckd")
    finally:                            # (rm walks it without recursion; pytest's rmtree cannot)
        subprocess.run(["rm", "-rf", str(deep)], check=True)


# --- 5f. Ends reported right

def test_a_self_check_exit_is_recorded_not_a_crash(sb):
    """Issue 20, 5f (i): "a self-check exit (delete buckd.pid while buckd runs with
    CHECK_INTERVAL 0.2) → buckd writes an end record: `status` afterwards must NOT say
    "vanished without a word" and the next `server` must not say "crashed"."""
    assert sb.buck("server", env={CHECK: "0.2"}).code == 0
    pid = sb.info()["pid"]
    (sb.dir() / buck.PID_FILE).unlink()
    wait_for(lambda: not alive(pid), timeout=10, what="buckd's self-check to end it")
    r = sb.buck("status")
    assert r.code == 0 and "vanished without a word" not in r.out, r.out
    r = sb.buck("server")
    assert r.code == 0 and "crashed" not in r.err, r.err


def test_a_start_failing_on_buckd_info_is_said_and_leaves_nothing(sb):
    """Issue 20, 5f (ii): "startup failure because buckd.info cannot be written (make
    `buckd.info` a non-empty directory before `server`) → the client fails in one line, no
    `buckd.info.*.tmp` left in the dir, and `status` does not call it SIGKILL/out of memory"."""
    (sb.dir() / buck.INFO_FILE).mkdir(parents=True)
    (sb.dir() / buck.INFO_FILE / "x").write_text("")
    r = sb.buck("server")
    assert r.code == 1 and one_line(r), r.err
    wait_for(lambda: not sb.daemons(), timeout=10, what="the failed buckd to exit")
    left = [p.name for p in sb.dir().iterdir() if p.name.startswith(f"{buck.INFO_FILE}.") and p.name.endswith(".tmp")]
    assert not left, left
    r = sb.buck("status")
    assert "SIGKILL" not in r.out and "out of memory" not in r.out, r.out


def test_a_clean_idle_exit_racing_a_client_is_not_a_crash(sb):
    """Issue 20, 5f (iii): "a clean idle exit racing a client is reported as a crash": the
    client read buckd.info, and by the time it holds lifecycle.lock that buckd has exited
    cleanly. Made exact: a buckd.info still naming a buckd whose buckd.end says it ended by idle
    (as a client finds it in that race): the next client says how it ended, never "crashed"."""
    env = {IDLE: "1"}
    assert sb.buck("server", env=env).code == 0
    info = sb.info()
    wait_for(lambda: not alive(info["pid"]), timeout=10, what="buckd to idle out")
    end = json.loads((sb.dir() / buck.END_FILE).read_text())
    assert end["how"] == "idle", end
    (sb.dir() / buck.INFO_FILE).write_text(json.dumps(info))     # as read before it exited
    r = sb.buck("server", env=env)
    assert r.code == 0 and "crashed" not in r.err, r.err
    assert f"pid {info['pid']} ended by idle" in r.err, r.err


# --- 5g. Quoting a crash log reads only its end

def test_quoting_a_huge_crash_log_stays_small(sb):
    """Issue 20, 5g: "Quoting a crash log does not read the whole file: make `buckd.stderr`
    huge (300 MB sparse) ... trigger the crash report path (`debug crash`) — assert the
    client's peak RSS stays small (ru_maxrss < 150 MB)"."""
    assert sb.buck("server").code == 0
    pid = sb.info()["pid"]
    log = sb.dir() / buck.STDERR_FILE
    assert f" pid {pid} " in log.read_text().splitlines()[0]
    os.truncate(log, 300 << 20)         # sparse; buckd writes on at its own offset
    proc = sb.spawn("debug", "crash", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wait_for(lambda: not alive(pid), timeout=10, what="buckd to panic")
    assert proc.returncode == 1
    assert usage.ru_maxrss < 150 * 1024, f"the client's peak RSS was {usage.ru_maxrss // 1024} MB"


# --- 5h. A marker rewritten is not a marker gone

def test_a_marker_rewritten_during_self_checks_keeps_buckd(sb):
    """Issue 20, 5h: "`.buckconfig` rewritten by delete-then-create during a self-check
    (CHECK_INTERVAL 0.05 ...) → buckd keeps running (same pid) — "gone means gone at two
    checks in a row"". For 3 s the marker is deleted, kept gone ~0.3 ms, recreated, and kept
    for 14-20 ms, over and over. The pauses shape that pattern; they synchronise nothing.
    The interval is 0.01 s, not 0.05: ~300 checks, of which one alone sees the marker gone
    with probability ~1 - 0.985^300 (today's buckd then exits), while two checks 10 ms apart
    cannot both fall in gaps 14 ms or more apart (unless a check is late by 4 ms or more)."""
    env = {CHECK: "0.01"}
    assert sb.buck("server", env=env).code == 0
    pid, marker, rng = sb.info()["pid"], sb.repo / buck.MARKER, random.Random(5)
    end = time.monotonic() + 3
    while time.monotonic() < end and alive(pid):
        marker.unlink()
        gone = time.perf_counter() + 0.0003
        while time.perf_counter() < gone:
            pass
        marker.write_text("")
        time.sleep(rng.uniform(0.014, 0.020))
    assert alive(pid), f"buckd ended: {(sb.dir() / buck.END_FILE).read_text()}"
    assert status_json(sb, env=env)["pid"] == pid


# --- 5i. Loopback down

def test_no_loopback_is_said_once_without_churn(sb):
    """Issue 20, 5i: "Loopback down: `unshare -n` → one clear line that there is no connection
    to 127.0.0.1 at all, no churn: at most ONE buckd started, and none left running"."""
    import shutil
    if not shutil.which("unshare") or subprocess.run(["unshare", "-n", "true"]).returncode:
        pytest.skip("`unshare -n` is not available here (needs root or user namespaces)")
    env = {k: v for k, v in sb.env.items() if v is not None}
    proc = subprocess.Popen(["unshare", "-n", PY, str(BUCK), "server"], cwd=sb.repo, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    r = result(proc, out, err)
    started = {l["pid"] for l in sb.lines() if l["step"] == "daemon.locked"}
    left = sb.daemons()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert r.code == 1 and "127.0.0.1" in one_line(r), r.err
    assert len(started) <= 1, f"{len(started)} buckds started"
    assert not left, f"buckds left running: {left}"


# --- 5j. The process name is valid UTF-8, without control characters

@pytest.mark.parametrize("name", ["ééééééééé", "a\nb\x1b[31m"])
def test_the_process_name_is_clean_utf8(sb, repos, name):
    """Issue 20, 5j: "a repository whose basename has multibyte UTF-8 characters crossing byte
    15 ... and one with a newline/escape → /proc/PID/comm is valid UTF-8 (decodes strictly)
    and has no control characters"."""
    repo = repos(name)
    assert sb.buck("server", cwd=repo).code == 0
    pid = info_of(dir_of(sb, repo))["pid"]
    comm = Path(f"/proc/{pid}/comm").read_bytes().removesuffix(b"\n")
    text = comm.decode("utf-8")         # strict: raises on a cut character
    assert text.isprintable(), repr(text)


# --- 5k. A FIFO at lifecycle.lock

def test_a_fifo_lifecycle_lock_fails_in_one_line_naming_it(sb):
    """Issue 20, 5k: "A FIFO at `lifecycle.lock` → `server` fails in one line that names the
    file, does not hang (bound 20 s)"."""
    sb.dir().mkdir(parents=True)
    os.mkfifo(sb.dir() / buck.LOCK_FILE)
    start = time.monotonic()
    r = sb.buck("server", timeout=60)
    assert time.monotonic() - start < 20
    assert r.code == 1 and buck.LOCK_FILE in one_line(r), r.err


# --- workload: the digest cache of `hash` (the only test here using `hash`)

def test_workload_a_whole_second_mtime_hashed_within_its_racy_window_is_read_again(sb):
    """WORKLOAD (`hash`), issue 20, 6 (iii): "the digest cache's racy window: a file whose mtime
    is a whole second (os.utime with ns = whole seconds) hashed within 2 s of that second must
    be READ AGAIN next time (status `files_read` grows on the second `hash`)"."""
    assert sb.buck("server").code == 0
    f = sb.repo / "f"
    f.write_text("content")
    whole = time.time_ns() // 1_000_000_000 * 1_000_000_000
    os.utime(f, ns=(whole, whole))
    assert sb.buck("hash", "f").code == 0
    if time.time_ns() - whole >= 2_000_000_000:
        pytest.skip("the first hash came more than 2 s after the mtime: not the racy window")
    first = status_json(sb)["files_read"]
    assert sb.buck("hash", "f").code == 0
    assert status_json(sb)["files_read"] > first, "a racy whole-second file's digest was cached"
