# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""The evidence that buckd keeps buck2's daemon_lifecycle.md, claim by claim.

Every test drives real processes: `buck.py` clients starting a real buckd, each test in a
HOME and repository of its own. Nothing is mocked and nothing sleeps to synchronise: we
poll for conditions with deadlines, and where a test must act at an exact moment of the
protocol it stops a process there (BUCK_LIFECYCLE_STOP_AT). At teardown `buck kill` stops
the test's daemons; any process still carrying the test's HOME is then killed by pid and
fails the test. These helpers read /proc: `make test` runs on Linux.
"""
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
BUCK = HERE / "buck.py"
PY = sys.executable
STDLIB = Path(os.__file__).parent
SMALL_TREES = [STDLIB / "email", STDLIB / "json", STDLIB / "concurrent"]   # real, not ours
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tools"))
import buck                         # noqa: E402  (the tool's names: TOOL, DAEMON, PID_FILE...)
import buckd                        # noqa: E402  (buckd.holder: who holds buckd.pid)
import lifecycle                    # noqa: E402  (tools/: the checker of the three guarantees)

# Run as a background job (`make test &`), we inherit SIGINT ignored, and so would every
# client we start: the Ctrl-C tests need clients that Ctrl-C reaches.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for(condition, timeout=15.0, what="the condition"):
    """Poll until condition() is truthy and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


def state(pid):
    """A process's state letter (R, S, T for stopped, Z...), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid):
    return state(pid) not in (None, "Z")


def stopped(pid):
    return state(pid) in ("T", "t")


def proc_file(pid, name):
    """/proc/PID/NAME (cmdline, environ) split at its NULs; [] once the process is gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def cmdline(pid):
    return proc_file(pid, "cmdline")


def lock_holder(pid_file):
    """Who holds the lock on a buckd.pid, as the kernel says (buckd.holder, the product's one
    query, which tools/ use too), or None."""
    assert os.path.basename(pid_file) == buck.PID_FILE, pid_file
    return buckd.holder(os.path.dirname(pid_file))


class Sandbox:
    """A HOME and a repository (a dir with .buckconfig) of one test's own."""

    def __init__(self, tmp):
        self.tmp, self.home, self.repo = tmp, tmp / "home", tmp / "repo"
        self.home.mkdir()
        self.repo.mkdir()
        (self.repo / buck.MARKER).write_text("")
        self.log = tmp / "lifecycle.log"
        self.env = {**os.environ, "HOME": str(self.home), buck.CHECK_INTERVAL_ENV: "0.2",
                    buck.LOG_ENV: str(self.log)}
        for name in ("GRPC_VERBOSITY", buck.IDLE_TIMEOUT_ENV, buck.STOP_AT_ENV, buck.INSTANCE_ENV,
                     buck.STARTED_ENV):
            self.env.pop(name, None)

    def dir(self, isolation=None):          # (None: buck.DEFAULT_ISOLATION; in this class
        isolation = isolation or buck.DEFAULT_ISOLATION     # body, `buck` is the method below)
        return self.home / buck.STATE_DIR / buck.DAEMON / str(self.repo).lstrip("/") / isolation

    def spawn(self, *args, script=BUCK, cwd=None, env=None, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        env = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}  # None: unset
        return subprocess.Popen([PY, str(script), *map(str, args)], cwd=cwd or self.repo,
                                env=env, stdin=subprocess.DEVNULL, **kw)

    def buck(self, *args, timeout=60, **kw):
        """Run a client to its end: code, out and err (text; rawout and rawerr: bytes)."""
        proc = self.spawn(*args, **kw)
        out, err = proc.communicate(timeout=timeout)
        return result(proc, out, err)

    def info(self, isolation=None):
        return json.loads((self.dir(isolation) / buck.INFO_FILE).read_text())

    def status(self):
        r = self.buck("status", "--json")
        assert r.code == 0, r.err
        return json.loads(r.out) if r.out.startswith("{") else None

    def processes(self):
        """Pids of the live processes that carry this test's HOME."""
        mine = f"HOME={self.home}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mine in f.read().split(b"\0") and alive(int(entry)):
                        pids.append(int(entry))
            except (OSError, ValueError):
                pass
        return pids

    def daemons(self):
        return [pid for pid in self.processes() if b"daemon" in cmdline(pid)]

    def one_daemon(self):
        """The pid of the only buckd of this test, once the others are gone."""
        return wait_for(lambda: len(d := self.daemons()) == 1 and d[0], what=f"exactly one {buck.DAEMON}")

    def holder(self):
        """Who holds buckd.pid's lock, or None (also while there is no buckd.pid yet)."""
        return lock_holder(self.dir() / buck.PID_FILE) if (self.dir() / buck.PID_FILE).exists() else None

    def lines(self):
        return lifecycle.load(self.log) if self.log.exists() else []

    def cleanup(self):
        for pid in self.processes():
            if stopped(pid):
                os.kill(pid, signal.SIGCONT)
        for d in self.dir().parent.glob(f"*/{buck.PID_FILE}"):
            self.buck("--isolation-dir", d.parent.name, "kill")
        try:
            wait_for(lambda: not self.processes(), timeout=10)
        except AssertionError:
            pass
        leaked = self.processes()
        for pid in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, f"processes left running: {[b' '.join(cmdline(p)) for p in leaked]}"


def result(proc, out, err):
    err = err or b""                    # (None when stderr went to stdout)
    return SimpleNamespace(code=proc.returncode, pid=proc.pid, rawout=out, rawerr=err,
                           out=out.decode(errors="replace"), err=err.decode(errors="replace"))


def finish(sb, proc, timeout=60):
    """Let a client run to its end, resuming it whenever it stopped itself at a step."""
    def done():
        if stopped(proc.pid):
            os.kill(proc.pid, signal.SIGCONT)
        return proc.poll() is not None
    try:
        wait_for(done, timeout, what=f"pid {proc.pid} to finish")
    except AssertionError:
        proc.kill()
        raise AssertionError(f"pid {proc.pid} did not finish: {proc.communicate()[1].decode()}")
    return result(proc, proc.stdout.read(), proc.stderr.read())


@pytest.fixture
def sb(tmp_path):
    sandbox = Sandbox(tmp_path)
    yield sandbox
    sandbox.cleanup()


@pytest.fixture
def other_buck(tmp_path):
    """A second checkout whose code differs by one comment: another buck version (a copy of
    buck.SOURCES, as the tools make it)."""
    return Path(lifecycle.other_version(BUCK, tmp_path / "other"))


def version_of(script=BUCK):
    return subprocess.run([PY, str(script), "version"], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def no_traceback(r):
    """No traceback of the client's own (a dead daemon's, quoted as "  | ...", is fine)."""
    assert not any(line.startswith("Traceback") for line in r.err.splitlines()), r.err
    return True


def one_line_error(r):
    """A failure said in one line `buck: ...` (a dead daemon's log may follow, quoted)."""
    said = [line for line in r.err.splitlines() if not line.startswith("  | ")]
    assert no_traceback(r) and said and said[-1].startswith(f"{buck.TOOL}: "), r.err
    return True


def guarantees_hold(sb, killed=()):
    """The lifecycle log of this test shows the doc's three guarantees kept."""
    lines = sb.lines()
    assert lines, "no lifecycle log was written"
    violations = lifecycle.check(lines, killed=killed)
    assert not violations, "\n".join(violations)
    return True


class RawClient:
    """A gRPC client of the running buckd without buck.py, for the calls buck.py never
    makes (malformed, or many at once)."""

    def __init__(self, info, channels=1):
        import grpc
        import daemon_pb2
        import daemon_pb2_grpc
        self.grpc, self.pb = grpc, daemon_pb2
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{info['port']}") for _ in range(channels)]
        self.stubs = [daemon_pb2_grpc.DaemonApiStub(c) for c in self.channels]
        self.metadata = ((buck.TOKEN_KEY, info["auth_token"]),)
        self.streams = []

    def command(self, *requests, go_ahead=True, i=0):
        """Start a Command stream: the requests; then, once buckd accepts, the go-ahead."""
        accepted = threading.Event()

        def messages():
            yield from requests
            if go_ahead and requests:
                accepted.wait()
                yield self.pb.CommandRequest()
        stream = self.stubs[i % len(self.stubs)].Command(messages(), metadata=self.metadata, timeout=60)
        self.streams.append(stream)
        return stream, accepted

    def events(self, request):
        """Run one command on a stream of its own, to its end: its events, then close."""
        try:
            stream, accepted = self.command(request)
            events = []
            for event in stream:
                events.append(event)
                if event.HasField("accepted"):
                    accepted.set()
            return events
        finally:
            self.close()

    def close(self):
        for stream in self.streams:
            stream.cancel()
        for channel in self.channels:
            channel.close()


# --- Commands that need no daemon

@pytest.mark.parametrize("args, code, stream", [
    (["help"], 0, "out"), (["-h"], 0, "out"), (["--help"], 0, "out"), ([], 2, "err")])
def test_help_needs_no_daemon(sb, args, code, stream):
    '''"There's a small set of commands/arguments that don't require the daemon (`buck
    help`, cli arg parse failures, `buck version`, ...)".'''
    r = sb.buck(*args)
    said = getattr(r, stream)
    assert r.code == code and said.startswith(f"usage: {buck.TOOL} ")
    assert all(f"  {name}" in said for name in ("help", "version", "status", "server", "kill", "killall"))
    assert "  daemon" not in r.out and "  debug" not in r.out      # hidden commands
    assert not (sb.home / buck.STATE_DIR).exists()


@pytest.mark.parametrize("args", [
    ["frobnicate"], ["status", "--bogus"], ["status", "--json=yes"], ["debug"],
    ["--isolation-dir", "../x", "status"], ["--isolation-dir"], ["debug", "sleep"],
    ["debug", "sleep", "1", "2"], ["kill", "extra"]])
def test_argument_errors_exit_2_without_daemon(sb, args):
    '''"cli arg parse failures" need no daemon: one line on stderr with the usage, exit 2.'''
    r = sb.buck(*args)
    assert r.code == 2 and f"usage: {buck.TOOL}" in r.err and one_line_error(r)
    assert len(r.err.splitlines()) == 1 and not (sb.home / buck.STATE_DIR).exists()


def test_version_and_help_import_no_grpc(sb):
    '''`buck version` needs no daemon, and is fast: it never imports grpc.'''
    for args in (["version"], ["help"]):
        proc = subprocess.run([PY, "-X", "importtime", str(BUCK), *args], cwd=sb.repo, env=sb.env,
                              capture_output=True, text=True)
        assert proc.returncode == 0
        assert "grpc" not in proc.stderr and "daemon_pb2" not in proc.stderr
    r = sb.buck("version")
    assert r.out == f"{buck.TOOL} {version_of()} (release {buck.RELEASE})\n"
    assert not (sb.home / buck.STATE_DIR).exists()


def test_version_is_derived_from_the_code(other_buck):
    '''"buck requires that the client and server are the same version": any edit of the
    code is a new version, like a new buck build.'''
    assert version_of() != version_of(other_buck)
    assert version_of() == version_of()


def test_outside_a_repository_fails_clearly(sb):
    '''"a directory in `$HOME/.buck` specific to that repository": with no repository (no
    .buckconfig in the cwd or above) there is no daemon dir, and we say so.'''
    r = sb.buck("server", cwd=sb.tmp)
    assert r.code == 1 and f"not in a repository: no {buck.MARKER}" in r.err and no_traceback(r)


@pytest.mark.parametrize("home", ["file", "unset"])
def test_unusable_home_fails_clearly(sb, home):
    '''"a directory in `$HOME/.buck`": a HOME that is a file, or none, is one line of error,
    not a traceback.'''
    (sb.tmp / "file").write_text("")
    r = sb.buck("server", env={"HOME": str(sb.tmp / "file") if home == "file" else None})
    assert r.code == 1 and r.err.startswith(f"{buck.TOOL}: ") and no_traceback(r)
    assert len(r.err.strip().splitlines()) == 1, r.err


def test_missing_stubs_say_how_to_fix(sb, tmp_path):
    '''"The buckd server exposes a simple grpc service": without the generated stubs the
    client says how to build them.'''
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("buck.py", "buckd.py", "buck_commands.py", "workload.py", "daemon.proto"):  # no stubs
        shutil.copy(HERE / name, bare / name)
    r = sb.buck("server", script=bare / "buck.py")
    assert r.code == 1 and "generated from daemon.proto" in r.err and one_line_error(r)


# --- Daemon process flow

def test_daemon_files_stdio_and_detachment(sb):
    '''"It will first daemonize itself and write its pid to a locked file "buckd.pid" in
    the "daemon directory" ... It redirects its stdout and stderr to files in the daemon
    directory." Then "it will write the port it is running on ... to the "buckd.info"".'''
    r = sb.buck("daemon", timeout=20)   # returns once buckd serves, holding none of our pipes
    assert r.code == 0, r.err
    d, info = sb.dir(), sb.info()
    pid = info["pid"]
    assert sorted(info) == ["auth_token", "pid", "port", "start_time", "version"]
    assert info["version"] == version_of()
    assert (d / buck.PID_FILE).read_text().strip() == str(pid)
    assert lock_holder(d / buck.PID_FILE) == pid      # the kernel says who: buckd itself
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == str(d / buck.STDOUT_FILE)
    assert os.readlink(f"/proc/{pid}/fd/2") == str(d / buck.STDERR_FILE)
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.getsid(pid) != os.getsid(0) and os.getsid(pid) != pid   # detached, no leader
    assert sb.status()["pid"] == pid


def test_second_daemon_fails_fast_naming_the_running_one(sb):
    '''"The file is locked exclusively by the daemon process until it exits. This means
    that only a single daemon is allowed at a time."'''
    pid = json.loads(sb.buck("server", "--json").out)["pid"]
    log = (sb.dir() / buck.STDERR_FILE).read_text()
    r = sb.buck("daemon", timeout=10)
    assert r.code == 3 and "already running" in r.err and f"pid {pid}" in r.err
    assert sb.status()["pid"] == pid and sb.one_daemon() == pid
    assert (sb.dir() / buck.STDERR_FILE).read_text().startswith(log)   # its log not clobbered


def test_files_are_private_and_bind_is_loopback(sb):
    """buckd.info holds a secret: the daemon dir and its files are the user's alone, and
    the port is served on 127.0.0.1 only."""
    sb.buck("server")
    d = sb.dir()
    for level in [d, *d.parents][:len(d.relative_to(sb.home).parts)]:   # .buck and below
        assert level.stat().st_mode & 0o777 == 0o700, level       # no one may list your repos
    for name in (buck.PID_FILE, buck.INFO_FILE, buck.LOCK_FILE, buck.STDOUT_FILE, buck.STDERR_FILE):
        assert (d / name).stat().st_mode & 0o777 == 0o600, name
    port = sb.info()["port"]
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                listening.append(local.split(":")[0])
    assert listening and all(a in ("0100007F", "0000000000000000FFFF00000100007F")
                             for a in listening), listening     # 127.0.0.1, maybe v4-mapped


def test_rpc_without_the_token_is_rejected(sb):
    '''"The buckd server exposes a simple grpc service that the client uses": the client,
    and only a client that read buckd.info (mode 0600), which holds the token.'''
    import grpc
    sys.path.insert(0, str(HERE))
    import daemon_pb2 as pb, daemon_pb2_grpc as pb_grpc
    sb.buck("server")
    info = sb.info()
    with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
        stub = pb_grpc.DaemonApiStub(channel)
        for metadata in (None, ((buck.TOKEN_KEY, "0" * 32),)):
            for call, request in ((stub.Status, pb.StatusRequest()), (stub.Kill, pb.KillRequest())):
                with pytest.raises(grpc.RpcError) as e:
                    call(request, metadata=metadata, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Command(iter([pb.CommandRequest(name="debug-crash")] * 2),
                                 metadata=metadata, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Status(pb.StatusRequest(), metadata=((buck.TOKEN_KEY, info["auth_token"]),))
        assert reply.pid == info["pid"] and alive(info["pid"])


def test_command_runs_only_after_the_clients_go_ahead(sb):
    """A command runs at most once: buckd answers `accepted` and runs it only once the
    client confirms it saw that answer. Without the go-ahead, nothing runs: here `debug
    crash`, which would have ended buckd."""
    import grpc
    sys.path.insert(0, str(HERE))
    import daemon_pb2 as pb, daemon_pb2_grpc as pb_grpc
    sb.buck("server")
    info = sb.info()
    with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
        request = pb.CommandRequest(name="debug crash", cwd=bytes(sb.repo))
        events = list(pb_grpc.DaemonApiStub(channel).Command(
            iter([request]), metadata=((buck.TOKEN_KEY, info["auth_token"]),), timeout=30))
    assert [e.WhichOneof("event") for e in events] == ["accepted"]
    assert sb.status()["pid"] == info["pid"] and alive(info["pid"])
    assert "Traceback" not in (sb.dir() / buck.STDERR_FILE).read_text()


# --- Client connection and buckd startup

def test_start_when_none_then_reuse(sb):
    '''"If there is an error during 1-3 ... the client needs to (re)start the buck daemon.
    Otherwise, the client can continue as it now has made a connection with a correctly
    versioned buckd."'''
    first = sb.buck("server", "--json")
    assert first.code == 0 and f"starting {buck.DAEMON}" in first.err
    second = sb.buck("server", "--json")
    assert second.code == 0 and second.err == ""
    assert json.loads(first.out)["pid"] == json.loads(second.out)["pid"] == sb.one_daemon()
    status = json.loads(second.out)
    assert status["version"] == version_of() and status["daemon_dir"] == str(sb.dir())
    assert {"port", "start_time", "uptime_s", "active_commands", "cache_entries"} <= set(status)


def test_status_never_starts_a_daemon(sb):
    '''"There's a small set of commands/arguments that don't require the daemon": `status`
    reports a daemon but never starts one.'''
    r = sb.buck("status")
    assert (r.code, r.out) == (0, f"no {buck.DAEMON} running\n") and not sb.processes()
    sb.buck("server")
    r = sb.buck("status")
    assert r.code == 0 and f"pid: {sb.info()['pid']}" in r.out


def test_kill_with_and_without_a_daemon(sb):
    '''Shutdown path 1: "The grpc api includes a `kill()` call that will shutdown buckd."'''
    r = sb.buck("kill")
    assert (r.code, r.out) == (0, f"no {buck.DAEMON} running\n")
    sb.buck("server")
    pid = sb.info()["pid"]
    r = sb.buck("kill")
    assert (r.code, r.out) == (0, f"{buck.DAEMON} killed (pid {pid})\n") and not alive(pid)
    assert not (sb.dir() / buck.INFO_FILE).exists()      # a clean exit removes it
    assert sb.buck("status").out == f"no {buck.DAEMON} running\nthe last one, pid {pid} ended by kill: `{buck.TOOL} kill` was invoked by pid {r.pid}\n"
    r = sb.buck("server", "--json")
    assert f"starting {buck.DAEMON}" in r.err and json.loads(r.out)["pid"] != pid


def test_version_mismatch_restarts(sb, other_buck):
    '''"For almost all commands, buck requires that the client and server are the same
    version of buck and may restart buckd to ensure that's the case."'''
    old = json.loads(sb.buck("server", "--json").out)
    r = sb.buck("server", "--json", script=other_buck)
    assert r.code == 0, r.err
    new = json.loads(r.out)
    assert f"{buck.DAEMON} version mismatch (daemon {version_of()}, client {version_of(other_buck)})" in r.err
    assert new["version"] == version_of(other_buck) and new["pid"] != old["pid"]
    assert not alive(old["pid"]) and sb.one_daemon() == new["pid"]
    assert json.loads(sb.buck("server", "--json").out)["version"] == version_of()


# --- The self-check and crash shutdown paths

@pytest.mark.parametrize("change", ["info deleted", "info rewritten", "pid rewritten",
                                    "pid file deleted", "daemon dir removed"])
def test_daemon_exits_when_its_files_no_longer_name_it(sb, change):
    '''Shutdown path 2: "buckd will periodically ... check the "buckd.pid" and "buckd.info"
    files to ensure that they still match that buckd process."'''
    sb.buck("server")
    d, pid = sb.dir(), sb.info()["pid"]
    if change == "info deleted":
        (d / buck.INFO_FILE).unlink()
    elif change == "info rewritten":
        (d / buck.INFO_FILE).write_text(json.dumps({**sb.info(), "port": 1}))
    elif change == "pid rewritten":
        (d / buck.PID_FILE).write_text("1\n")
    elif change == "pid file deleted":
        (d / buck.PID_FILE).unlink()
    else:
        shutil.rmtree(d)
    wait_for(lambda: not alive(pid), what=f"{buck.DAEMON} to exit")
    r = sb.buck("server", "--json")
    assert r.code == 0 and json.loads(r.out)["pid"] != pid


def test_crash_exits_and_is_reported(sb):
    """Shutdown path 3: "If buckd hits a rust `panic()` the buckd process will exit"."""
    sb.buck("server")
    pid = sb.info()["pid"]
    r = sb.buck("debug", "crash")
    assert r.code == 1 and no_traceback(r)
    assert f"lost {buck.DAEMON} (pid {pid})" in r.err and "RuntimeError" in r.err
    assert f"starting {buck.DAEMON}" not in r.err                 # the command was not re-sent
    wait_for(lambda: not alive(pid))
    assert "Traceback" in (sb.dir() / buck.STDERR_FILE).read_text()
    r = sb.buck("server", "--json")
    assert r.code == 0 and f"{buck.DAEMON} crashed, see" in r.err and "RuntimeError" in r.err
    assert json.loads(r.out)["pid"] != pid


# --- Correctness guarantees

def test_race_cold_start_ends_with_one_daemon(sb):
    """Guarantee 1: "Only a single buckd is running at a time": 12 clients racing from cold
    all succeed on one daemon, round after round."""
    for _ in range(3):
        clients = [sb.spawn("server", "--json") for _ in range(12)]
        results = [result(c, *c.communicate(timeout=120)) for c in clients]
        assert all(r.code == 0 for r in results), [r.err for r in results]
        pids = {json.loads(r.out)["pid"] for r in results}
        assert len(pids) == 1, [r.err for r in results]
        assert sb.one_daemon() == pids.pop()
        assert sum(f"starting {buck.DAEMON}" in r.err for r in results) == 1
        assert sb.buck("kill").code == 0 and not sb.daemons()
    assert guarantees_hold(sb)


def test_race_clients_wait_for_lifecycle_lock_and_reuse(sb):
    """Guarantee 2: "Only a single client is killing/starting a buckd at a time": clients
    that find lifecycle.lock taken wait, say for whom, then use the daemon it started."""
    d = sb.dir()
    d.mkdir(parents=True)
    fd = os.open(d / buck.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"pid 4242: the test\n")
    logs = [sb.tmp / f"client{i}.err" for i in range(6)]
    clients = [sb.spawn("server", "--json", stderr=log.open("wb")) for log in logs]
    wait_for(lambda: all("pid 4242: the test" in log.read_text() for log in logs),
             what="every client to say whom it waits for")
    assert sb.buck("daemon").code == 0 and all(c.poll() is None for c in clients)
    os.close(fd)
    outs = [c.communicate(timeout=60)[0] for c in clients]
    assert all(c.returncode == 0 for c in clients)
    assert {json.loads(o)["pid"] for o in outs} == {sb.info()["pid"]}
    assert not any(f"starting {buck.DAEMON}" in log.read_text() for log in logs)
    assert guarantees_hold(sb)


def test_race_two_versions_never_use_a_mismatched_daemon(sb, other_buck):
    """Guarantee 3: "A client **will not** use a server with a mismatched version": clients
    of two versions racing either report a daemon of their own version or fail saying why."""
    versions = {BUCK: version_of(), other_buck: version_of(other_buck)}
    scripts = [BUCK, other_buck] * 6
    clients = [sb.spawn("server", "--json", script=s) for s in scripts]
    clients += [sb.spawn("debug", "sleep", "0", script=s) for s in scripts[:4]]
    results = [result(c, *c.communicate(timeout=180)) for c in clients]
    for script, r in zip(scripts, results):
        assert no_traceback(r)
        if r.code == 0:
            assert json.loads(r.out)["version"] == versions[script]
        else:
            assert one_line_error(r)
    assert any(r.code == 0 for r in results)
    sb.one_daemon()
    assert guarantees_hold(sb)              # the commands too ran on a checked buckd


def test_race_client_killed_holding_lifecycle_lock(sb):
    """A client that dies while it holds lifecycle.lock (flock: released when the holder
    exits) does not block the next one."""
    client = sb.spawn("server", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = sb.dir() / buck.LOCK_FILE
    wait_for(lambda: lock.exists() and f"pid {client.pid}:" in lock.read_text())
    client.send_signal(signal.SIGSTOP)
    fd = os.open(lock, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):    # it really holds the lock as it dies
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    client.kill()
    client.wait()
    r = sb.buck("server", "--json", timeout=30)
    assert r.code == 0, r.err
    assert sb.one_daemon() == json.loads(r.out)["pid"]
    assert guarantees_hold(sb, killed={client.pid})


# --- Faults

def test_sigkilled_daemon_leaves_stale_files_that_are_survived(sb):
    '''"If there is an error during 1-3 ... the client needs to (re)start the buck daemon":
    a SIGKILLed buckd leaves buckd.info and buckd.pid behind; they are survived.'''
    sb.buck("server")
    pid = sb.info()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid))
    assert (sb.dir() / buck.INFO_FILE).exists()
    assert sb.buck("status").out == f"no {buck.DAEMON} running\nthe last one, pid {pid} vanished without a word (SIGKILL, or out of memory?)\n"
    r = sb.buck("server", "--json")
    assert r.code == 0 and f"{buck.DAEMON} crashed, see" in r.err and json.loads(r.out)["pid"] != pid


@pytest.mark.parametrize("content", ["{not json", "", "truncated", '{"pid": "x"}'])
def test_corrupt_info_is_survived(sb, content):
    '''"read the "buckd.info" file to get the port": if it cannot be read (corrupt, empty,
    truncated), that is "an error during 1-3", and buckd is restarted.'''
    sb.buck("server")
    info_path, pid = sb.dir() / buck.INFO_FILE, sb.info()["pid"]
    if content == "truncated":
        content = info_path.read_text()[:40]
    info_path.write_text(content)
    r = sb.buck("server", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["pid"] != pid and sb.one_daemon() == json.loads(r.out)["pid"]


def test_port_that_never_answers_is_not_waited_for_forever(sb):
    '''"If there is an error during 1-3 ... the client needs to (re)start the buck daemon":
    a port that accepts connections and never answers counts as such an error.'''
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        sb.dir().mkdir(parents=True)
        (sb.dir() / buck.INFO_FILE).write_text(json.dumps({
            "pid": os.getpid(), "port": silent.getsockname()[1], "version": "x",
            "auth_token": "t", "start_time": 0}))
        r = sb.buck("status", timeout=30)
        assert (r.code, r.out) == (0, f"no {buck.DAEMON} running\n")   # no one holds buckd.pid
        r = sb.buck("server", "--json", timeout=30)
        assert r.code == 0, r.err
        assert json.loads(r.out)["port"] != silent.getsockname()[1]


def test_wedged_daemon_is_killed_as_a_last_resort(sb):
    """"ensure the buckd process has exited (based on pid)": a buckd that does not answer
    the kill call (here: stopped) is SIGKILLed, as it provably holds buckd.pid."""
    sb.buck("server")
    pid = sb.info()["pid"]
    os.kill(pid, signal.SIGSTOP)
    r = sb.buck("status", timeout=30)
    assert r.code == 1 and f"{buck.DAEMON} (pid {pid}) is not responding" in r.err and one_line_error(r)
    r = sb.buck("kill", timeout=60)
    assert (r.code, r.out) == (0, f"{buck.DAEMON} killed (pid {pid})\n") and not alive(pid)


def test_stale_pid_file_naming_a_live_process_never_gets_it_killed(sb):
    """Only the holder of the buckd.pid lock is buckd: a stale file naming a reused pid
    must not get an unrelated process killed."""
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        sb.dir().mkdir(parents=True)
        (sb.dir() / buck.PID_FILE).write_text(f"{bystander.pid}\n")
        (sb.dir() / buck.INFO_FILE).write_text(json.dumps({
            "pid": bystander.pid, "port": 1, "version": "x", "auth_token": "t", "start_time": 0}))
        assert sb.buck("server").code == 0
        assert sb.buck("kill").code == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# --- Commands run in the daemon

def test_output_is_streamed_and_ctrl_c_cancels(sb):
    """Ctrl-C in the client cancels the command in the daemon (active_commands counts
    handlers still running); the daemon keeps running."""
    sb.buck("server")
    pid = sb.info()["pid"]
    client = sb.spawn("debug", "sleep", "300")
    assert client.stdout.readline() == b"sleeping for 300 s\n"   # while it still runs
    wait_for(lambda: sb.status()["active_commands"] == 1)
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=10) == 130
    wait_for(lambda: sb.status()["active_commands"] == 0)
    assert sb.status()["pid"] == pid
    assert sb.buck("debug", "sleep", "0").code == 0


def test_sigkilled_client_cancels_its_command(sb):
    '''"Most work is done by the daemon process": a client that dies takes its command
    with it (active_commands drops back).'''
    sb.buck("server")
    client = sb.spawn("debug", "sleep", "300")
    client.stdout.readline()
    wait_for(lambda: sb.status()["active_commands"] == 1)
    client.kill()
    client.wait()
    wait_for(lambda: sb.status()["active_commands"] == 0)


@pytest.mark.parametrize("killer", ["kill", "other version"])
def test_kill_during_a_command_tells_the_client_why(sb, other_buck, killer):
    '''"If there are other invocations currently using the buck daemon when it is killed or
    restarted by a client, those invocations will fail due to the early disconnection."'''
    sb.buck("server")
    client = sb.spawn("debug", "sleep", "300")
    client.stdout.readline()
    k = sb.buck("kill") if killer == "kill" else sb.buck("server", script=other_buck)
    r = result(client, *client.communicate(timeout=20))
    assert r.code == 1 and no_traceback(r)
    if killer == "kill":
        assert f"{buck.DAEMON} shut down during the command: `{buck.TOOL} kill` was invoked by pid {k.pid}" in r.err
    else:
        assert f"{buck.DAEMON} was restarted by pid {k.pid}" in r.err


@pytest.mark.parametrize("death", ["crash", "SIGKILL"])
def test_daemon_dying_under_a_command_is_reported(sb, death):
    '''"If buckd hits a rust `panic()` the buckd process will exit": a command running at
    that moment fails, saying so and showing the end of buckd.stderr.'''
    sb.buck("server")
    pid = sb.info()["pid"]
    client = sb.spawn("debug", "sleep", "300")
    client.stdout.readline()
    if death == "crash":
        assert sb.buck("debug", "crash").code == 1
    else:
        os.kill(pid, signal.SIGKILL)
    r = result(client, *client.communicate(timeout=20))
    assert r.code == 1 and f"lost {buck.DAEMON} (pid {pid}) during the command" in r.err
    assert str(sb.dir() / buck.STDERR_FILE) in r.err
    assert ("RuntimeError" in r.err) == (death == "crash")


# --- Only a proven buckd is ever signalled ("ensure the buckd process has exited (based
# on pid)": the pid the kernel says holds buckd.pid's lock, never the file's text).

@pytest.fixture
def decoy():
    """A live process of ours that no buck command may ever signal."""
    proc = subprocess.Popen(["sleep", "1000"])
    yield proc
    survived = proc.poll() is None
    proc.kill()
    proc.wait()
    assert survived, f"the decoy (pid {proc.pid}) was signalled"


def rewrite_in_place(path, text):
    """Rewrite a file keeping its inode (buckd's lock stays on it)."""
    with open(path, "r+") as f:
        f.truncate()
        f.write(text)


@pytest.mark.parametrize("text", ["decoy", "0", "1", "", "garbage", "-1"])
def test_kill_stops_the_lock_holder_whatever_buckd_pid_says(sb, decoy, text):
    """Required by issue 8: `buckd.pid` rewritten in place while buckd runs; `kill` stops
    the real buckd, exits 0, and the process the text names survives."""
    sb.buck("server", env={buck.CHECK_INTERVAL_ENV: "100"})
    pid = sb.info()["pid"]
    rewrite_in_place(sb.dir() / buck.PID_FILE, f"{decoy.pid}\n" if text == "decoy" else text)
    r = sb.buck("kill", timeout=30)
    assert (r.code, r.out) == (0, f"{buck.DAEMON} killed (pid {pid})\n"), r.err
    assert not alive(pid) and lock_holder(sb.dir() / buck.PID_FILE) is None


@pytest.mark.parametrize("text", ["decoy", "0", "1", "garbage"])
def test_restart_stops_the_lock_holder_whatever_buckd_pid_says(sb, decoy, other_buck, text):
    """The restart path too (another version asks): the real buckd is stopped, the decoy
    is not signalled, and no crash is reported for a buckd that is alive."""
    sb.buck("server", env={buck.CHECK_INTERVAL_ENV: "100"})
    pid = sb.info()["pid"]
    rewrite_in_place(sb.dir() / buck.PID_FILE, f"{decoy.pid}\n" if text == "decoy" else text)
    r = sb.buck("server", "--json", script=other_buck, timeout=30)
    assert r.code == 0 and "version mismatch" in r.err and "crashed" not in r.err, r.err
    assert not alive(pid) and json.loads(r.out)["pid"] == sb.one_daemon()


def test_a_stopped_holder_that_lets_go_is_not_signalled(sb, tmp_path):
    """The re-check before each signal: a pid that held buckd.pid when the client looked,
    and no longer does when it signals, is left alone (here a stand-in that unlocks)."""
    sb.dir().mkdir(parents=True)
    holder = subprocess.Popen([PY, "-c", f"""if True:
        import fcntl, os, sys
        fd = os.open({str(sb.dir() / buck.PID_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.readline()
        fcntl.lockf(fd, fcntl.LOCK_UN)
        print("unlocked", flush=True)
        sys.stdin.readline()"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        client = sb.spawn("kill", env={buck.STOP_AT_ENV: "restart.2"})
        wait_for(lambda: stopped(client.pid), what="the client to stop at restart.2")
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "unlocked\n"
        r = finish(sb, client)
        assert r.code == 0 and holder.poll() is None, r.err      # not signalled
    finally:
        holder.kill()
        holder.wait()


def test_long_stale_pid_text_is_truncated(sb):
    """buckd truncates buckd.pid once it holds the lock: a longer stale text must not
    remain after its pid (its self-check would then see "another process" and exit)."""
    sb.dir().mkdir(parents=True)
    (sb.dir() / buck.PID_FILE).write_text("123456789012345678\n")
    sb.buck("server")
    pid = sb.info()["pid"]
    assert (sb.dir() / buck.PID_FILE).read_text() == f"{pid}\n"
    ticks = sb.status()["uptime_s"]
    wait_for(lambda: sb.status()["uptime_s"] > ticks + 1, what="several self-checks")
    assert sb.info()["pid"] == pid and alive(pid)


# --- buckd outlives an interrupted start, and a busy buckd is not a dead one

def test_ctrl_c_during_a_cold_start_keeps_the_daemon(sb):
    """Ctrl-C to the client's process group while buckd starts: the client exits 130,
    buckd (whose launcher may be gone) keeps serving, and the next command uses it."""
    client = sb.spawn("server", env={buck.STOP_AT_ENV: "daemon.locked"},
                      process_group=0)
    pid = wait_for(sb.holder, what=f"{buck.DAEMON} to lock {buck.PID_FILE}")
    wait_for(lambda: stopped(pid), what=f"{buck.DAEMON} to stop at daemon.locked")
    os.killpg(client.pid, signal.SIGINT)
    assert client.wait(timeout=20) == 130
    os.kill(pid, signal.SIGCONT)
    r = sb.buck("server", "--json")
    assert r.code == 0 and r.err == "" and json.loads(r.out)["pid"] == pid, r.err
    assert guarantees_hold(sb)


def test_launcher_killed_while_buckd_starts_is_survived(sb):
    """A `buck daemon` launcher killed by a signal: the client neither fails with an empty
    reason nor kills the buckd that is starting; it uses it once it serves."""
    client = sb.spawn("server", "--json", env={buck.STOP_AT_ENV: "daemon.locked"})
    pid = wait_for(sb.holder, what=f"{buck.DAEMON} to lock {buck.PID_FILE}")
    wait_for(lambda: stopped(pid))
    launcher = next(p for p in sb.processes() if b"daemon" in cmdline(p) and p != pid)
    os.kill(launcher, signal.SIGKILL)
    wait_for(lambda: not alive(launcher))
    os.kill(pid, signal.SIGCONT)
    r = finish(sb, client)
    assert r.code == 0 and json.loads(r.out)["pid"] == pid, r.err
    assert "failed to start" not in r.err and sb.one_daemon() == pid


def test_busy_daemon_answers_status_and_is_reused(sb):
    '''"Generally, we support concurrent buck invocations": with 120 commands running,
    Status and a new client get their answer at once and reuse the same buckd; past
    MAX_COMMANDS (256) a command is refused as busy, clearly, and never restarts buckd.'''
    sb.buck("server")
    info = sb.info()
    raw = RawClient(info, channels=8)
    try:
        for i in range(120):
            raw.command(raw.pb.CommandRequest(name="debug sleep", args=[b"300"], cwd=b"/"), i=i)
        wait_for(lambda: sb.status()["active_commands"] == 120, timeout=60)
        r = sb.buck("server", "--json")
        assert r.code == 0 and r.err == "" and json.loads(r.out)["pid"] == info["pid"], r.err
        for i in range(120, 256):
            raw.command(raw.pb.CommandRequest(name="debug sleep", args=[b"300"], cwd=b"/"), i=i)
        wait_for(lambda: sb.status()["active_commands"] == 256, timeout=60)
        r = sb.buck("debug", "sleep", "0")
        assert r.code == 1 and f"{buck.DAEMON} is busy" in r.err and one_line_error(r)
        assert sb.status()["pid"] == info["pid"]
    finally:
        raw.close()
    wait_for(lambda: sb.status()["active_commands"] == 0, timeout=30)
    assert sb.buck("debug", "sleep", "0").code == 0


# --- Bad input fails its own call, never buckd

@pytest.mark.parametrize("requests, code", [
    ([], "INVALID_ARGUMENT"),
    ([dict(name="frobnicate", cwd=b"/")], "INVALID_ARGUMENT"),
    ([dict(name="debug sleep", args=[b"0"], cwd=b"relative")], "INVALID_ARGUMENT"),
    ([dict(name="debug sleep", args=[b"0"], cwd=b"")], "INVALID_ARGUMENT"),
    ([dict(name="debug sleep", cwd=b"/")], 2),
    ([dict(name="debug sleep", args=[b"soon"], cwd=b"/")], 2),
    ([dict(name="debug sleep", args=[b"nan"], cwd=b"/")], 2),
    ([dict(name="debug sleep", args=[b"1", b"2"], cwd=b"/")], 2),
    ([dict(name="debug sleep", args=[b"0"], options={"x": ""}, cwd=b"/")], 2),
    ([dict(name="debug sleep", args=[b"0\0"], cwd=b"/")], "INVALID_ARGUMENT"),
    ([dict(name="debug sleep", args=[b"0"], cwd=b"/tmp\0x")], "INVALID_ARGUMENT"),
])
def test_malformed_requests_end_their_own_call(sb, requests, code):
    """Any client with the token may send anything: a malformed request ends that call
    (INVALID_ARGUMENT before it is accepted, or exit code 2 and a message), and buckd
    keeps serving. Only buckd's own bugs are panics (`debug crash`)."""
    sb.buck("server")
    info = sb.info()
    raw = RawClient(info)
    try:
        stream, accepted = raw.command(*[raw.pb.CommandRequest(**r) for r in requests])
        events = []
        try:
            for event in stream:
                events.append(event)
                if event.HasField("accepted"):
                    accepted.set()
        except raw.grpc.RpcError as e:
            assert e.code().name == code, e
        else:
            assert events[-1].exit_code == code, events
            said = b"".join(e.stderr for e in events)     # as the client says its own
            assert code != 2 or said.startswith(f"{buck.TOOL}: debug sleep: ".encode()) \
                and f"(usage: {buck.TOOL} ".encode() in said
    finally:
        raw.close()
    assert sb.status()["pid"] == info["pid"] and sb.buck("debug", "sleep", "0").code == 0


# --- No client traceback, ever

def test_no_grpc_is_one_line_for_every_command(sb):
    """Without grpc installed (here: python -S, no site-packages) every command that needs
    it says how to fix it in one line, a buckd running or not."""
    sb.buck("server")
    for args in (["status"], ["kill"], ["server"], ["debug", "sleep", "0"]):
        proc = subprocess.run([PY, "-S", str(BUCK), *args], cwd=sb.repo, env=sb.env,
                              capture_output=True, text=True, timeout=30)
        r = SimpleNamespace(code=proc.returncode, err=proc.stderr)
        assert r.code == 1 and "needs grpcio and protobuf" in r.err and one_line_error(r), (args, r.err)
    assert sb.status()["pid"] == sb.info()["pid"]


def test_ctrl_c_once_buck_py_runs_exits_130_quietly(sb):
    """Ctrl-C once buck.py's own code runs, at a step of the protocol, while holding
    lifecycle.lock or during a command, exits 130 without a traceback."""
    sb.buck("server")
    for when in ("command", "connect.1", "connect.3", "restart.1"):
        if when == "restart.1":
            (sb.dir() / buck.INFO_FILE).write_text("{corrupt")
        if when == "command":
            client = sb.spawn("debug", "sleep", "10")
            assert client.stdout.readline()     # running in buckd
        else:
            client = sb.spawn("server", env={buck.STOP_AT_ENV: when})
            wait_for(lambda: stopped(client.pid), what=f"the client to stop at {when}")
        os.kill(client.pid, signal.SIGINT)
        if stopped(client.pid):
            os.kill(client.pid, signal.SIGCONT)
        r = result(client, *client.communicate(timeout=30))
        assert r.code == 130 and no_traceback(r), (when, r.err)
    assert guarantees_hold(sb)      # a client interrupted holding lifecycle.lock said so


def test_ctrl_c_is_the_importers_and_ignored_in_a_background_job(sb):
    """Ctrl-C is quiet only where buck runs as the program: a program that imports buck keeps
    its own Ctrl-C (tools and tests clean up on it); a client started with SIGINT ignored (a
    background job) ignores it to its end, its command too."""
    check = "import signal, buck; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    r = subprocess.run([PY, "-c", check], cwd=HERE, capture_output=True, text=True)
    assert r.stdout == "True\n", r.stderr
    assert sb.buck("server").code == 0
    client = sb.spawn("debug", "sleep", "2", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert client.stdout.readline()     # running in buckd
    os.kill(client.pid, signal.SIGINT)
    r = result(client, *client.communicate(timeout=30))
    assert (r.code, r.out, r.err) == (0, "", ""), r.err


def test_startup_failure_before_stdio_is_redirected_is_one_line(sb):
    """buckd failing before it redirects its stdio (buckd.pid is a directory): one line
    with the reason, and no daemon."""
    (sb.dir() / buck.PID_FILE).mkdir(parents=True)
    r = sb.buck("server")
    assert r.code == 1 and one_line_error(r) and len(r.err.splitlines()) == 2, r.err
    assert f"{buck.DAEMON} failed to start: {buck.DAEMON} cannot lock" in r.err and "Is a directory" in r.err
    assert not sb.daemons()


# --- Configuration, environment and signals

@pytest.mark.parametrize("name", [buck.CHECK_INTERVAL_ENV, buck.IDLE_TIMEOUT_ENV])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon", "1e300"])
def test_bad_durations_are_a_clear_error(sb, name, value):
    """A bad BUCKD_CHECK_INTERVAL or BUCKD_IDLE_TIMEOUT stops the start with one line:
    never a daemon spinning at 100% CPU (0, negative, nan) or crashing (inf)."""
    r = sb.buck("server", env={name: value})
    assert r.code == 1 and one_line_error(r) and f"{name} must be seconds" in r.err, r.err
    assert len(r.err.splitlines()) == 1 and not sb.daemons()      # (no "starting buckd" first)


def test_zero_check_interval_is_refused(sb):
    r = sb.buck("server", env={buck.CHECK_INTERVAL_ENV: "0"})
    assert r.code == 1 and f"{buck.CHECK_INTERVAL_ENV} must be seconds" in r.err


@pytest.mark.parametrize("user", [None, "DEBUG"])
def test_buckd_gets_the_users_grpc_verbosity(sb, user):
    """The client silences grpc for itself only: buckd gets the user's environment
    (GRPC_VERBOSITY unset: buckd's own default, ERROR)."""
    sb.buck("server", env={"GRPC_VERBOSITY": user})
    pid = sb.info()["pid"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    verbosity = [v for v in environ if v.startswith(b"GRPC_VERBOSITY=")]
    assert verbosity == ([b"GRPC_VERBOSITY=" + user.encode()] if user else [])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_shut_buckd_down_cleanly(sb, sig):
    """A signal is a request to shut down, handled in the main loop: buckd stops its
    commands (their clients are told why), removes buckd.info and logs why."""
    sb.buck("server")
    pid = sb.info()["pid"]
    client = sb.spawn("debug", "sleep", "300")
    client.stdout.readline()
    os.kill(pid, sig)
    r = result(client, *client.communicate(timeout=20))
    assert r.code == 1 and f"{buck.DAEMON} shut down during the command: {buck.DAEMON} received {sig.name}" in r.err
    wait_for(lambda: not alive(pid))
    assert not (sb.dir() / buck.INFO_FILE).exists()
    assert f"received {sig.name}" in (sb.dir() / buck.STDERR_FILE).read_text()
    assert [l["step"] for l in sb.lines() if l["pid"] == pid][-2:] == ["daemon.shutdown", "daemon.exit"]


def test_waiting_message_is_one_safe_line(sb):
    """The holder's text in lifecycle.lock is printed escaped, on one line: no newline or
    terminal escape from another client's arguments reaches the user's terminal."""
    d = sb.dir()
    d.mkdir(parents=True)
    fd = os.open(d / buck.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"pid 4242: evil\nsecond line \x1b[31mred\x07")
        log = sb.tmp / "client.err"
        client = sb.spawn("server", stderr=log.open("wb"))
        wait_for(lambda: "pid 4242" in log.read_text())
    finally:
        os.close(fd)
    client.communicate(timeout=60)
    waiting = [line for line in log.read_text().splitlines() if "waiting" in line]
    assert waiting == [f"{buck.TOOL}: waiting for another {buck.TOOL} client to finish starting or killing "
                       f"{buck.DAEMON}: pid 4242: evil\\nsecond line \\x1b[31mred\\x07"]


# --- Smaller promises

def test_old_buckd_never_removes_a_newer_buckds_info(sb):
    """A buckd whose buckd.pid was replaced exits at its self-check, cleanly, without
    deleting the buckd.info of the buckd that now holds the new buckd.pid."""
    sb.buck("server", env={buck.CHECK_INTERVAL_ENV: "0.5"})
    old = sb.info()["pid"]
    os.kill(old, signal.SIGSTOP)
    replacement = sb.dir() / f"{buck.PID_FILE}.new"
    replacement.write_text("")
    os.replace(replacement, sb.dir() / buck.PID_FILE)
    assert sb.buck("daemon", env={buck.CHECK_INTERVAL_ENV: "100"}).code == 0
    new = sb.info()["pid"]
    os.kill(old, signal.SIGCONT)
    wait_for(lambda: not alive(old), what=f"the old {buck.DAEMON}'s self-check")
    assert sb.info()["pid"] == new and sb.status()["pid"] == new


def test_a_command_that_finished_reports_its_exit_code(sb):
    """A command whose handler has returned is reported with its exit code, even if the
    shutdown begins before its last event is sent (here: buckd stopped meanwhile)."""
    sb.buck("server")
    pid = sb.info()["pid"]
    client = sb.spawn("debug", "sleep", "0.5")
    client.stdout.readline()
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    wait_for(lambda: time.monotonic() > stopped_at + 1, what="the sleep to be over")
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGCONT)
    r = result(client, *client.communicate(timeout=20))
    assert r.code == 0, r.err


def test_crash_report_points_at_the_kept_log(sb):
    """A crashed buckd's stderr is kept in prev/ when the next one starts, and every report
    of the crash points at the file that holds its traceback."""
    sb.buck("server")
    pid = sb.info()["pid"]
    client = sb.spawn("debug", "sleep", "300")
    client.stdout.readline()
    assert sb.buck("debug", "crash").code == 1
    r = sb.buck("server")
    assert f"{buck.DAEMON} crashed, see " in r.err and "RuntimeError" in r.err
    lost = result(client, *client.communicate(timeout=20))
    assert f"lost {buck.DAEMON} (pid {pid})" in lost.err and "RuntimeError" in lost.err   # its tail
    path = r.err.split(", see ")[1].split("\n")[0]
    assert path == str(sb.dir() / buck.PREV_DIR / buck.STDERR_FILE)
    assert "RuntimeError" in Path(path).read_text() and f"pid {pid} " in Path(path).read_text()
    assert "Traceback" not in (sb.dir() / buck.STDERR_FILE).read_text()



def test_a_crash_is_said_once_and_a_later_failed_start_says_only_its_own_error(sb):
    """Issue 19: "after a crash, every later failed start (a bad BUCKD_IDLE_TIMEOUT) repeats the
    old traceback before its error": a bad setting is refused in one line of its own, before
    anything about the crash; the next good start says the crash, once; the one after, nothing."""
    assert sb.buck("server").code == 0
    assert sb.buck("debug", "crash").code == 1
    for _ in range(2):
        r = sb.buck("server", env={buck.IDLE_TIMEOUT_ENV: "soon"})
        assert r.code == 1 and len(r.err.splitlines()) == 1 and one_line_error(r), r.err
        assert buck.IDLE_TIMEOUT_ENV in r.err and "crashed" not in r.err and "  | " not in r.err
    r = sb.buck("server")
    assert r.code == 0 and f"{buck.DAEMON} crashed, see " in r.err and "RuntimeError" in r.err, r.err
    assert sb.buck("kill").code == 0
    r = sb.buck("server")
    assert r.code == 0 and "crashed" not in r.err and "  | " not in r.err, r.err

# --- "A client only uses a buckd connection after making sure it has a compatible version"

def test_command_goes_to_the_daemon_whose_version_was_checked(sb, other_buck):
    """A command is sent on the very connection whose version was checked: stopped right
    after its check, while another version replaces buckd, the client never hands its
    command to that other buckd (it reconnects and restarts instead)."""
    sb.buck("server")
    client = sb.spawn("debug", "sleep", "0", env={buck.STOP_AT_ENV: "connect.3"})
    wait_for(lambda: stopped(client.pid), what="the client to stop after its version check")
    other = json.loads(sb.buck("server", "--json", script=other_buck).out)["pid"]
    r = finish(sb, client)
    assert (r.code, r.out) == (0, "sleeping for 0 s\n"), r.err
    assert not alive(other)              # restarted away, never used
    assert guarantees_hold(sb)


def test_hand_started_daemon_during_a_restart_is_used(sb):
    """`buck daemon` exits 3 when a buckd already holds buckd.pid: a client whose start
    loses to one started by hand uses that one instead of failing."""
    client = sb.spawn("server", "--json", env={buck.STOP_AT_ENV: "restart.2"})
    wait_for(lambda: stopped(client.pid), what="the client to stop before its start")
    assert sb.buck("daemon").code == 0
    pid = sb.info()["pid"]
    r = finish(sb, client)
    assert r.code == 0 and json.loads(r.out)["pid"] == pid, r.err
    assert [l.get("exit") for l in sb.lines() if l["step"] == "restart.4"] == [3]


# --- An idle buckd goes away

def test_idle_daemon_exits_but_never_during_a_command(sb):
    """BUCKD_IDLE_TIMEOUT: buckd shuts down cleanly once no client has called for that
    long, never while a command runs, and says so in its log."""
    sb.buck("server", env={buck.IDLE_TIMEOUT_ENV: "1.5", buck.CHECK_INTERVAL_ENV: "100"})
    pid = sb.info()["pid"]
    r = sb.buck("debug", "sleep", "3")
    assert r.code == 0 and alive(pid), r.err
    until = time.monotonic() + 3
    while time.monotonic() < until:             # a client calling now and then keeps it
        assert sb.status()["pid"] == pid
    wait_for(lambda: not alive(pid), timeout=10, what=f"{buck.DAEMON} to exit, idle")
    assert f"no command for 1.5 s ({buck.IDLE_TIMEOUT_ENV})" in (sb.dir() / buck.STDERR_FILE).read_text()
    assert not (sb.dir() / buck.INFO_FILE).exists()


def test_lifecycle_log_records_the_docs_steps(sb):
    """BUCK_LIFECYCLE_LOG: every client and buckd appends a JSON line per step of the doc,
    in the order taken: here a cold start, a command, and a kill."""
    sb.buck("server")
    sb.buck("debug", "sleep", "0")
    k = sb.buck("kill")
    lines = sb.lines()
    daemon = lines[3]["pid"]
    steps = [(l["role"], l["step"]) for l in lines]
    assert steps == [("client", "connect.1"), ("client", "restart.1"), ("client", "restart.2"),
                     ("daemon", "daemon.locked"), ("daemon", "daemon.serving"),
                     ("client", "restart.4"), ("client", "restart.5"), ("client", "restart.6"),
                     ("client", "connect.1"), ("client", "connect.3"),
                     ("client", "connect.1"), ("client", "connect.3"), ("client", "command"),
                     ("client", "restart.1"), ("client", "restart.2"), ("daemon", "daemon.shutdown"),
                     ("daemon", "daemon.exit"), ("client", "restart.3"), ("client", "restart.6")]
    assert lines[0]["found"] is False and lines[2]["daemon_pid"] is None
    assert lines[4]["port"] > 0
    assert lines[6]["daemon_pid"] == daemon and lines[9]["ok"] is True
    assert lines[12] | {"t": 0} == {"t": 0, "pid": lines[12]["pid"], "run": lines[12]["run"], "role": "client",
                                    "version": version_of(), "dir": str(sb.dir()),
                                    "step": "command", "daemon_pid": daemon, "name": "debug sleep"}
    assert lines[15]["path"] == "kill" and lines[15]["reason"] == f"`{buck.TOOL} kill` was invoked by pid {k.pid}"
    assert lines[17]["how"] == "rpc" and all(a["t"] <= b["t"] for a, b in zip(lines, lines[1:]))
    assert guarantees_hold(sb)


# --- The lifecycle log's checker and view (lifecycle.py), on hand-made logs: a checker
# that cannot fail proves nothing, so each break of a guarantee is fed to it here.

A, B = "1a2b3c4d", "9f3e5d6c"       # two versions
DIR = "/home/u/.buck/buckd/src/repo/v2"


def hand_log(*steps):
    """Log lines from (pid, version, step, fields) tuples; the role follows the step."""
    return [{"t": 1700000000.0 + i / 100, "pid": pid, "version": version, "dir": DIR,
             "role": "daemon" if step.startswith("daemon.") else "client", "step": step, **fields}
            for i, (pid, version, step, fields) in enumerate(steps)]


def s(pid, step, version=A, **fields):
    return (pid, version, step, fields)


def start(client, daemon, version=A):
    """A client that finds no buckd.info: it takes the lock, launches a buckd, connects."""
    return [s(client, "connect.1", version, found=False), *launch(client, daemon, version),
            *reuse(client, daemon, version)]


def launch(client, daemon, version=A, kill=None):
    """A turn of lifecycle.lock: (kill the buckd `kill`, of the other version,) start one."""
    other = {A: B, B: A}[version]
    killing = [s(kill, "daemon.shutdown", other, reason=f"restarted by pid {client}", path="kill"),
               s(kill, "daemon.exit", other),
               s(client, "restart.3", version, daemon_pid=kill, how="rpc")] if kill else []
    return [s(client, "restart.1", version), s(client, "restart.2", version, daemon_pid=kill),
            *killing, s(daemon, "daemon.locked", version),
            s(daemon, "daemon.serving", version, port=40000 + daemon),
            s(client, "restart.4", version, exit=0),
            s(client, "restart.5", version, daemon_pid=daemon), s(client, "restart.6", version)]


def reuse(client, daemon, version=A, daemon_version=None):
    """Steps 1-3 of client connection: a buckd.info found, its version checked."""
    daemon_version = daemon_version or version
    return [s(client, "connect.1", version, found=True),
            s(client, "connect.3", version, daemon_pid=daemon, daemon_version=daemon_version,
              ok=daemon_version == version)]


COLD = hand_log(s(812, "connect.1", found=False), s(813, "connect.1", found=False),     # 1, 2
           *start(812, 900)[1:],                                                   # 3-11
           s(813, "restart.1"), s(813, "restart.6"), *reuse(813, 900),             # 12-15
           s(813, "command", daemon_pid=900, name="debug sleep"))                         # 16


def test_a_cold_race_of_two_clients_holds():
    assert COLD[2]["step"] == "restart.1" and COLD[11]["step"] == "restart.1"
    assert lifecycle.check(COLD) == []


def test_load_numbers_lines_and_names_a_torn_one(tmp_path):
    path = tmp_path / "log"
    path.write_text("".join(json.dumps(x) + "\n" for x in COLD) + '{"t": 17000, "pid": 8')
    lines = lifecycle.load(path)
    assert lines[:-1] == COLD and len(lines) == 17
    assert lifecycle.check(lines) == ["line 17 is not a log line (a torn write?): "
                                      "'{\"t\": 17000, \"pid\": 8'"]


def test_two_buckds_at_once_in_one_dir():
    lines = hand_log(*start(812, 900), s(901, "daemon.locked"), s(900, "daemon.exit"))
    assert lifecycle.check(lines) == [f"guarantee 1 (one buckd at a time): line 11 pid 901 daemon.locked "
                                      f"while pid 900's daemon.locked at line 4 is open (dir {DIR})"]


def test_two_buckds_in_two_dirs_are_fine():
    lines = hand_log(*start(812, 900), s(901, "daemon.locked", dir=DIR + "x"), s(900, "daemon.exit"))
    assert lifecycle.check(lines) == []


def test_a_section_opened_twice_by_one_pid():
    lines = hand_log(s(812, "restart.1"), s(812, "restart.1"))
    assert lifecycle.check(lines) == [f"guarantee 2 (one client starting/killing at a time): line 2 pid "
                                      f"812 restart.1 while its own restart.1 at line 1 is open (dir {DIR})"]


def test_two_clients_restarting_at_once():
    lines = hand_log(s(812, "connect.1", found=False), s(813, "connect.1", found=False),
                s(812, "restart.1"), s(812, "restart.2", daemon_pid=None),
                s(813, "restart.1"), s(812, "restart.6"), s(813, "restart.6"))
    assert lifecycle.check(lines) == [f"guarantee 2 (one client starting/killing at a time): line 5 pid "
                                      f"813 restart.1 while pid 812's restart.1 at line 3 is open "
                                      f"(dir {DIR})"]


def test_a_command_without_a_version_check():
    lines = hand_log(*start(812, 900)[:-1], s(812, "command", daemon_pid=900, name="debug sleep"))
    assert lifecycle.check(lines) == ["guarantee 3 (a compatible version only): line 10 pid 812 command "
                                      "debug sleep on buckd 900 with no earlier connect.3 of its own accepting "
                                      "buckd 900 at version 1a2b3c4d"]


def test_a_command_on_another_buckd_than_the_one_checked():
    lines = hand_log(*start(812, 900), s(812, "command", daemon_pid=901, name="debug sleep"))
    assert lifecycle.check(lines) == ["guarantee 3 (a compatible version only): line 11 pid 812 command "
                                      "debug sleep on buckd 901 with no earlier connect.3 of its own accepting "
                                      "buckd 901 at version 1a2b3c4d (its last connect.3, line 10, was for "
                                      "buckd 900)"]


def test_a_command_on_a_buckd_another_client_checked():
    lines = hand_log(*start(812, 900), s(813, "command", daemon_pid=900, name="debug sleep"))
    assert lifecycle.check(lines) == ["guarantee 3 (a compatible version only): line 11 pid 813 command "
                                      "debug sleep on buckd 900 with no earlier connect.3 of its own accepting "
                                      "buckd 900 at version 1a2b3c4d"]


def test_accepting_a_mismatched_version():
    lines = hand_log(*start(812, 900),
                s(813, "connect.1", B, found=True),
                s(813, "connect.3", B, daemon_pid=900, daemon_version=A, ok=True))
    assert lifecycle.check(lines) == ["guarantee 3 (a compatible version only): line 12 pid 813 accepted "
                                      "buckd 900 of version 1a2b3c4d, its own is 9f3e5d6c"]


def test_a_command_on_a_buckd_whose_own_version_differs():
    """The client's connect.3 says the versions match, the buckd's own lines say not."""
    lines = hand_log(*start(812, 900, version=B)[:-1],
                s(812, "connect.3", B, daemon_pid=900, daemon_version=B, ok=True))
    lines[3]["version"] = lines[4]["version"] = A             # buckd 900 is of version A
    lines.append({**lines[-1], "step": "command", "name": "debug sleep"})
    assert lifecycle.check(lines) == ["guarantee 3 (a compatible version only): line 11 pid 812 command "
                                      "debug sleep on buckd 900, whose line 4 says version 1a2b3c4d; its own is "
                                      "9f3e5d6c"]


SIGKILLED_HOLDERS = hand_log(s(812, "connect.1", found=False), s(812, "restart.1"),   # 812 dies
                        s(900, "daemon.locked"),                                 # 900 dies
                        s(813, "connect.1", found=False), s(813, "restart.1"),
                        s(901, "daemon.locked"), s(813, "restart.6"))


def test_killed_closes_a_dead_holders_section():
    assert lifecycle.check(SIGKILLED_HOLDERS, killed={812, 900}) == []


def test_without_killed_a_dead_holder_still_holds():
    assert lifecycle.check(SIGKILLED_HOLDERS) == [
                                                  f"guarantee 2 (one client starting/killing at a time): line 5 pid 813 restart.1 while "
                                                  f"pid 812's restart.1 at line 2 is open (dir {DIR})",
                                                  f"guarantee 1 (one buckd at a time): line 6 pid 901 daemon.locked while pid 900's "
                                                  f"daemon.locked at line 3 is open (dir {DIR})"]


def test_a_clients_restart_3_closes_the_buckd_it_saw_gone():
    """A client SIGKILLed a wedged buckd (no daemon.exit): its restart.3 ends that section."""
    lines = hand_log(*start(812, 900), s(813, "restart.1"), s(813, "restart.2", daemon_pid=900),
                     s(813, "restart.3", daemon_pid=900, how="sigkill"), s(901, "daemon.locked"),
                     s(813, "restart.6"))
    assert lifecycle.check(lines) == []
    assert len(lifecycle.check(lines[:-3] + lines[-2:])) == 1     # without it: two buckd


def test_a_reused_pid_is_another_process():
    """Pids are reused: a SIGKILLed holder's pid, reused by a later client, still lets the
    killed one's section end at its own last line (`run` tells the two apart)."""
    lines = hand_log(s(812, "restart.1"), s(813, "restart.1"), s(813, "restart.6"),
                     s(812, "connect.1", found=True))
    lines[0]["run"], lines[3]["run"] = "a", "b"
    assert lifecycle.check(lines, killed={812}) == []
    del lines[0]["run"], lines[3]["run"]            # without run ids: one process, still open
    assert len(lifecycle.check(lines, killed={812})) == 1


def test_killed_does_not_close_a_section_before_the_pids_last_line():
    lines = hand_log(s(900, "daemon.locked"), s(901, "daemon.locked"), s(900, "daemon.serving", port=1))
    assert len(lifecycle.check(lines, killed={900})) == 1


def race12():
    """A cold race of 12 `buck server` clients, odd pids of version A, even ones of B; then
    4 `buck debug sleep 0` clients reuse the last buckd, and a `buck kill` of each version ends it."""
    version = {c: (B, A)[c % 2] for c in range(801, 813)}
    lines = [s(c, "connect.1", version[c], found=False) for c in version]
    lines += launch(801, 900) + reuse(801, 900)
    for c in (802, 803, 804, 805, 806, 807, 808, 809, 810, 812):  # found it done: reuse or not
        lines += [s(c, "restart.1", version[c]), s(c, "restart.6", version[c])]
        lines += reuse(c, 900, version[c], daemon_version=A)
    lines += [s(811, "restart.1"), s(811, "restart.6")]          # 811 is slow to read it
    lines += launch(802, 901, B, kill=900) + reuse(802, 901, B)
    for c in (804, 806, 808, 810, 812):
        lines += [s(c, "restart.1", B), s(c, "restart.6", B), *reuse(c, 901, B)]
    lines += reuse(811, 901, A, daemon_version=B) + launch(811, 902, A, kill=901) + reuse(811, 902)
    for c in (820, 821, 822, 823):
        lines += [*reuse(c, 902), s(c, "command", daemon_pid=902, name="debug sleep")]
    lines += [s(830, "restart.1"), s(830, "restart.2", daemon_pid=902),
              s(902, "daemon.shutdown", reason="`buck kill` was invoked by pid 830", path="kill"),
              s(902, "daemon.exit"), s(830, "restart.3", daemon_pid=902, how="rpc"),
              s(830, "restart.6"), s(831, "restart.1", B), s(831, "restart.2", B, daemon_pid=None),
              s(831, "restart.6", B)]
    return hand_log(*lines)


def test_the_race12_log_holds():
    assert lifecycle.check(race12()) == []


@pytest.mark.parametrize("width", [100, 80])
def test_lanes_fit_the_width_and_name_the_steps(width):
    view = lifecycle.lanes(race12(), width)
    assert max(map(len, view.splitlines())) <= width
    for code in ("c1 none", "c3 ok", "c3 VERS", "r1 LOCK", "r2 kill", "r2 none", "r3 rpc",
                 "r4 run", "r5 up", "r6 FREE", "LOCKED", ":40900", "!kill", "EXIT",
                 "4 reuse D 902"):
        assert code in view, code
    assert "D 900" in view.splitlines()[1] and "v1a2b" in view.splitlines()[2]


def test_lanes_mark_who_holds_and_who_waits():
    rows = lifecycle.lanes(COLD).splitlines()
    header = rows[1]
    c812, c813, d900 = (header.index(n) for n in ("C 812", "C 813", "D 900"))
    row = {int(r[:3]): r for r in rows[3:19]}
    assert row[5][c812] == "|" and row[5][c813] == "." and row[5][d900:].startswith("LOCKED")
    assert row[12][c812] == " " and row[12][d900] == "|" and row[12][c813:].startswith("r1 LOCK")


def test_lanes_and_summary_survive_odd_lines():
    lines = COLD + [{**COLD[0], "step": "connect.2", "new": [1]}, {"_bad": '{"t": 1'}]
    view = lifecycle.lanes(lines)
    assert "\n17 connect " in view and "line 18 is not a log line: skipped" in view
    assert "C 812 launched D 900; C 813 (nothing to do)." in lifecycle.summary(lines)


def test_summary_says_who_waited_and_what_each_version_got():
    text = " ".join(lifecycle.summary(race12()).split())
    assert "C 802 killed D 900 (rpc), launched D 901" in text
    assert "through this many turns of others: C 802 11, C 803 2," in text
    assert "Version 9f3e: buckds D 901;" in text
    assert "C 802 (v9f3e) at D 900 (v1a2b)" in text
    assert "D 902 (v1a2b) shut down (kill): `buck kill` was invoked by pid 830." in text


def test_command_line(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("".join(json.dumps(x) + "\n" for x in COLD))
    bad.write_text("".join(json.dumps(x) + "\n" for x in SIGKILLED_HOLDERS))
    assert lifecycle.main(["check", str(good)]) == 0
    assert capsys.readouterr().out == "ok: 16 lines, the three guarantees hold\n"
    assert lifecycle.main(["check", str(bad)]) == 1 and "guarantee 2" in capsys.readouterr().out
    assert lifecycle.main(["check", str(bad), "--killed", "812,900"]) == 0
    assert lifecycle.main(["lanes", str(good)]) == 0 and "legend" in capsys.readouterr().out
    for argv in ([], ["check"], ["check", str(tmp_path / "none")], ["lanes", str(good), "--x", "1"],
                 ["check", str(good), "--killed", "a"], ["race", "--clients"]):
        assert lifecycle.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("lifecycle: ") and err.count("\n") == 1, err


# --- Found in review: the cache, buckd.pid and odd input

def test_a_fifo_for_buckd_info_hangs_nobody(sb):
    """Files are read without waiting on a FIFO, and buckd compares buckd.info without opening
    it: a FIFO there is a rewritten buckd.info, nothing more."""
    sb.buck("server")
    pid = sb.info()["pid"]
    os.kill(pid, signal.SIGSTOP)            # its self-check waits until status has looked
    (sb.dir() / buck.INFO_FILE).unlink()
    os.mkfifo(sb.dir() / buck.INFO_FILE)
    assert sb.buck("status", timeout=30).code == 1          # it runs, but is not named
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: not alive(pid), what=f"{buck.DAEMON}'s self-check to see the change")
    r = sb.buck("server", "--json", timeout=30)
    assert r.code == 0 and json.loads(r.out)["pid"] != pid, r.err


def test_paths_that_are_not_utf8(sb, tmp_path):
    """A repository or an isolation dir that is not UTF-8 works like any other, cold or warm:
    no traceback, no endless restarts. (An argument that is not UTF-8: test_workload.py.)"""
    repo = os.fsdecode(os.path.join(bytes(tmp_path), b"repo \xff"))
    os.mkdir(repo)
    open(os.path.join(repo, buck.MARKER), "w").close()
    pids = []
    for _ in range(2):                      # cold, then warm
        r = sb.buck("server", "--json", cwd=repo)
        assert r.code == 0 and no_traceback(r), r.err
        pids.append(json.loads(r.out)["pid"])
        r = sb.buck("debug", "sleep", "0", cwd=repo)
        assert (r.code, r.out) == (0, "sleeping for 0 s\n"), r.err
    assert pids[0] == pids[1]
    r = sb.buck("--isolation-dir", os.fsdecode(b"iso\xff"), "status", "--json", cwd=repo)
    assert r.code == 0 and no_traceback(r)
    for isolation in (buck.DEFAULT_ISOLATION, os.fsdecode(b"iso\xff")):
        sb.buck("--isolation-dir", isolation, "kill", cwd=repo)


def test_silent_streams_never_starve_status(sb):
    """Command streams that never send their command count against MAX_COMMANDS from the
    moment they open: they cannot take the threads that Status and Kill need."""
    sb.buck("server")
    info = sb.info()
    raw = RawClient(info, channels=8)
    never = threading.Event()
    try:
        for i in range(300):      # (kept: a call no one holds is cancelled)
            raw.streams.append(raw.stubs[i % 8].Command(iter(never.wait, True), metadata=raw.metadata,
                                                        timeout=60))
        wait_for(lambda: sb.status()["active_commands"] == 256, timeout=60)
        r = sb.buck("server", "--json")
        assert r.code == 0 and r.err == "" and json.loads(r.out)["pid"] == info["pid"], r.err
        r = sb.buck("debug", "sleep", "0")
        assert r.code == 1 and f"{buck.DAEMON} is busy" in r.err
    finally:
        never.set()
        raw.close()


def test_a_relative_lifecycle_log_is_the_clients_cwds(sb):
    """BUCK_LIFECYCLE_LOG relative to the client's cwd: buckd (whose cwd is /) writes there too."""
    sb.buck("server", env={buck.LOG_ENV: "relative.log"})
    roles = {json.loads(line)["role"] for line in (sb.repo / "relative.log").read_text().splitlines()}
    assert roles == {"client", "daemon"}


# --- Hostile surroundings fail one call, never buckd, never silently (issue 16)

def within(sb, *args, seconds=30, **kw):
    """Run a client that must end within `seconds`: one that hangs is killed and fails the
    test. Its result also says how long it took (elapsed)."""
    started = time.monotonic()
    proc = sb.spawn(*args, **kw)
    try:
        out, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        err = proc.communicate()[1] or b""
        raise AssertionError(f"`{buck.TOOL} {' '.join(map(str, args))}` still ran after {seconds} s: {err.decode(errors='replace')}")
    r = result(proc, out or b"", err)
    r.elapsed = time.monotonic() - started
    return r


def cpu_seconds(pid):
    """The CPU time (user + system) a process has used so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_of_sources(where):
    """A copy of buck.SOURCES (and the generated stubs) in dir `where`: a checkout of our own,
    to edit. Returns the path of its buck.py."""
    where.mkdir()
    for name in {*buck.SOURCES, "daemon_pb2.py", "daemon_pb2_grpc.py"}:
        shutil.copy(HERE / name, where / name)
    return where / "buck.py"


@pytest.mark.parametrize("fd", [0, 1, 2], ids=["stdin", "stdout", "stderr"])
def test_daemon_started_with_a_closed_std_fd_serves_idles_and_stops(sb, fd):
    """Issue 16: `buck daemon <&-` (and `>&-`, `2>&-`) exits 0 without a word, and its buckd
    serves; idle, buckd does not spin (its CPU time stays nearly flat for a second); SIGTERM
    stops it cleanly, and it leaves no buckd.info behind."""
    r = within(sb, "daemon", preexec_fn=lambda: os.close(fd))
    assert (r.code, r.err) == (0, ""), r.err
    pid = sb.info()["pid"]
    assert sb.status()["pid"] == pid
    before, since = cpu_seconds(pid), time.monotonic()
    wait_for(lambda: time.monotonic() > since + 1.0, what="a second of idleness")
    spent = cpu_seconds(pid) - before
    assert spent < 0.3, f"an idle {buck.DAEMON} used {spent:.2f} s of CPU in a second"
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), what=f"{buck.DAEMON} to exit on SIGTERM")
    assert not (sb.dir() / buck.INFO_FILE).exists()
    assert "received SIGTERM" in (sb.dir() / buck.STDERR_FILE).read_text()


@pytest.mark.parametrize("args, stdout, reason", [
    (["status"], "/dev/full", "No space left on device"),
    (["version"], "/dev/full", "No space left on device"),
    (["server"], "/dev/full", "No space left on device"),
    (["debug", "sleep", "0"], "/dev/full", "No space left on device"),
    (["status"], "closed", "Bad file descriptor")])
def test_output_that_cannot_be_written_is_one_line_and_exit_1(sb, args, stdout, reason):
    """Issue 16: `buck status|version|server|debug sleep 0 >/dev/full` (stdout buffered: no
    PYTHONUNBUFFERED) and `buck status >&-` exit 1 with one line saying why, no traceback;
    buckd serves on."""
    sb.buck("server")
    pid = sb.info()["pid"]
    with open(os.devnull if stdout == "closed" else stdout, "wb") as sink:
        r = within(sb, *args, stdout=sink, env={"PYTHONUNBUFFERED": None},
                   preexec_fn=(lambda: os.close(1)) if stdout == "closed" else None)
    assert (r.code, r.err) == (1, f"{buck.TOOL}: cannot write output: {reason}\n")
    assert sb.status()["pid"] == pid and sb.status()["active_commands"] == 0


def test_a_command_whose_output_cannot_be_written_is_cancelled_in_buckd(sb):
    """Issue 16: a command running in buckd whose client cannot write its output (`debug
    sleep`'s first line) fails in one line, and the command in buckd is cancelled, not left
    running. (`hash`'s: test_workload.py.)"""
    sb.buck("server")
    with open("/dev/full", "wb") as full:
        r = within(sb, "debug", "sleep", "300", stdout=full, env={"PYTHONUNBUFFERED": None})
    assert (r.code, r.err) == (1, f"{buck.TOOL}: cannot write output: No space left on device\n")
    wait_for(lambda: sb.status()["active_commands"] == 0, what=f"the command to be cancelled in {buck.DAEMON}")


@pytest.mark.parametrize("log", ["/dev/stderr", "fifo", "directory", "missing dir", "under a file"])
def test_a_lifecycle_log_that_is_no_regular_file_never_hangs_a_start(sb, log):
    """Issue 16: BUCK_LIFECYCLE_LOG naming /dev/stderr (the client's pipe), a FIFO that no
    one reads, a directory or a path that cannot be created: `buck server` exits 0 at once
    (well under START_TIMEOUT), and its buckd stays alive and serves."""
    path = {"fifo": sb.tmp / "fifo", "directory": sb.tmp, "missing dir": sb.tmp / "missing" / "log",
            "under a file": sb.repo / buck.MARKER / "log"}.get(log, log)
    if log == "fifo":
        os.mkfifo(path)
    r = within(sb, "server", "--json", seconds=20, env={buck.LOG_ENV: str(path)})
    assert r.code == 0 and r.elapsed < 15, r.err
    pid = json.loads(r.out)["pid"]
    uptime = sb.status()["uptime_s"]
    wait_for(lambda: sb.status()["uptime_s"] > uptime + 1, what=f"{buck.DAEMON} to serve a while longer")
    assert alive(pid) and sb.status()["pid"] == pid


@pytest.mark.parametrize("content", ["lone surrogate token", "nested 100000 deep"])
def test_hostile_buckd_info_is_one_line_and_survived(sb, content):
    """Issue 16: a buckd.info whose auth_token is a lone surrogate ("\\udcff") or whose JSON is
    nested 100,000 deep: `status`, `server` and `kill`, with a buckd running or not, say at
    most one line (exit 0 or 1), never a traceback, and `server` ends with a working buckd."""
    quiet = {buck.CHECK_INTERVAL_ENV: "100"}     # the buckd stays, though its info is rewritten
    sb.buck("server", env=quiet)
    info = sb.info()
    text = json.dumps({**info, "auth_token": "\udcff"}) if content.startswith("lone") else "[" * 100000
    assert content.startswith("nested") or "\\udcff" in text
    for command in ("status", "server", "kill", "status", "server"):
        if (sb.dir() / buck.PID_FILE).exists():       # a buckd that has served a while: not
            os.utime(sb.dir() / buck.PID_FILE, (time.time() - 60,) * 2)  # one starting
        (sb.dir() / buck.INFO_FILE).write_text(text)
        r = within(sb, command, env=quiet)
        assert r.code in (0, 1) and no_traceback(r), (command, r.err)
        assert r.code == 0 or one_line_error(r)
        if command == "server":
            assert r.code == 0, r.err
            assert sb.status()["pid"] == sb.info()["pid"] != info["pid"]
            assert sb.buck("debug", "sleep", "0").code == 0


def test_a_fifo_for_buckd_pid_hangs_nobody(sb):
    """Issue 16: a FIFO at buckd.pid, no buckd running: `status` (no buckd running) and
    `kill` exit 0, `server` fails in one line (buckd cannot lock it: not a regular file);
    each returns within seconds."""
    sb.dir().mkdir(parents=True)
    os.mkfifo(sb.dir() / buck.PID_FILE)
    r = within(sb, "status", seconds=10)
    assert (r.code, r.out) == (0, f"no {buck.DAEMON} running\n"), r.err
    r = within(sb, "kill", seconds=10)
    assert (r.code, r.out) == (0, f"no {buck.DAEMON} running\n"), r.err
    r = within(sb, "server", seconds=20)
    assert r.code == 1 and one_line_error(r), r.err
    assert "cannot lock" in r.err and "not a regular file" in r.err
    assert not sb.daemons()


def test_a_bad_seconds_operand_fails_its_own_call_only(sb):
    """Issue 16: `buck debug sleep ²` (a digit to str.isdigit, not to float) exits 2 with the
    usage error in one line; buckd keeps running (same pid), and another client's running
    `debug sleep 30` is unaffected."""
    sb.buck("server")
    pid = sb.info()["pid"]
    sleeper = sb.spawn("debug", "sleep", "30")
    assert sleeper.stdout.readline() == b"sleeping for 30 s\n"
    r = within(sb, "debug", "sleep", "²")
    assert (r.code, r.out, r.err) == (2, "", f"{buck.TOOL}: debug sleep: SECONDS must be seconds from 0 to "
                                             f"1e+07, not ² (usage: {buck.TOOL} debug sleep SECONDS)\n")
    status = sb.status()
    assert (status["pid"], status["active_commands"]) == (pid, 1) and sleeper.poll() is None
    sleeper.send_signal(signal.SIGINT)
    assert sleeper.wait(timeout=10) == 130
    wait_for(lambda: sb.status()["active_commands"] == 0)


@pytest.mark.parametrize("args, said", [
    (["debug sleep", "5", "6"], "unknown command debug sleep"),
    (["debug sleep", "5"], "unknown command debug sleep"),
    (["status", "--json", "--json"], "--json given twice"),
    (["status", "--json=yes"], "--json takes no value")])
def test_argv_words_are_taken_as_given(sb, args, said):
    """Issue 16: a command is its words: `buck "debug sleep" 5 6` (one argv word) is an unknown
    command, not a sleep; an option given twice is a usage error. Exit 2, one line, and no
    buckd is started."""
    r = within(sb, *args)
    assert r.code == 2 and said in r.err and len(r.err.splitlines()) == 1 and one_line_error(r), r.err
    assert r.out == "" and not sb.daemons()


def test_buckd_says_a_usage_error_as_the_client_does(sb):
    """Issue 16: an exit-2 error that buckd finds (a raw client sends `debug sleep` with the
    operand "x") has the very form of the client's own: `buck: debug sleep: ... (usage: buck
    debug sleep SECONDS)`."""
    own = sb.buck("debug", "sleep")                     # found by the client
    assert own.code == 2 and own.err == f"{buck.TOOL}: debug sleep: missing operand(s) (usage: {buck.TOOL} debug sleep SECONDS)\n"
    sb.buck("server")
    raw = RawClient(sb.info())
    events = raw.events(raw.pb.CommandRequest(name="debug sleep", args=[b"x"], cwd=b"/"))
    assert events[-1].exit_code == 2, events
    assert b"".join(e.stderr for e in events) == (f"{buck.TOOL}: debug sleep: SECONDS must be seconds "
                                                  f"from 0 to 1e+07, not x (usage: {buck.TOOL} debug sleep "
                                                  f"SECONDS)\n").encode()


REAPER = """if True:
    import ctypes, os, subprocess, sys
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)     # PR_SET_CHILD_SUBREAPER: orphans come to us
    launcher = subprocess.Popen(sys.argv[1:]).pid
    while True:                 # waiting all along, the launcher and buckd alike: each exit is
        try:                    # reaped as it happens (buckd may end before its launcher does)
            pid, status = os.wait()
        except ChildProcessError:
            break
        code = os.waitstatus_to_exitcode(status)
        print(f"launched {code}" if pid == launcher else f"exit {pid} {code}", flush=True)
"""


@pytest.mark.parametrize("method", ["Status", "Kill", "serve"])
def test_a_bug_in_buckd_is_a_panic_wherever_it_happens(sb, tmp_path, method):
    """Issue 16: "If buckd hits a rust `panic()` the buckd process will exit", in Status, in
    Kill or in serve() as in a command: buckd (a copy of ours with a bug planted in that
    method) exits with code 101, its traceback in buckd.stderr, and buckd.end says "panic"."""
    script = copy_of_sources(tmp_path / "planted")
    lines = (script.parent / "buckd.py").read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"def {method}("))
    indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())] + "    "
    while not lines[at].split("#")[0].rstrip().endswith(":"):      # a signature on several lines
        at += 1
    lines.insert(at + 1, f'{indent}if os.environ.get("PLANTED_BUG"): raise RuntimeError("planted bug")\n')
    (script.parent / "buckd.py").write_text("".join(lines))
    (tmp_path / "reaper.py").write_text(REAPER)
    reaper = sb.spawn(PY, script, "daemon", script=tmp_path / "reaper.py", env={"PLANTED_BUG": "1"})
    said = [reaper.stdout.readline().decode()]
    if said[0] != "launched 0\n":                      # (buckd ended first: serve)
        said.append(reaper.stdout.readline().decode())
    assert "launched 0\n" in said, said
    pid = sb.info()["pid"]
    if method != "serve":
        r = within(sb, method.lower(), script=script)
        assert no_traceback(r)
    try:
        said.append(reaper.communicate(timeout=30)[0].decode())
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{buck.DAEMON} (pid {pid}) survived the bug planted in {method}") from None
    wait_for(lambda: not alive(pid), what=f"{buck.DAEMON} to exit")
    exits = [line for line in "".join(said).splitlines() if line != "launched 0"]
    assert exits in ([f"exit {pid} 101"], []), said     # (under load the reaper, rarely, sees no
    last = [line for line in sb.lines() if line["pid"] == pid][-1]     # exit: the log says it)
    assert (last["step"], last.get("code")) == ("daemon.exit", buck.EXIT_PANIC), last
    log = (sb.dir() / buck.STDERR_FILE).read_text()
    assert "Traceback" in log and "RuntimeError: planted bug" in log, log
    end = json.loads((sb.dir() / buck.END_FILE).read_text())
    assert end["pid"] == pid and end["how"] == "panic" and "planted bug" in end["why"], end


def test_a_client_that_merely_paused_never_restarts_a_healthy_buckd(sb):
    """Issue 16: a client whose Status timed out because buckd was stopped (or the client
    paused), and which then takes lifecycle.lock, asks that buckd once more: buckd, running
    again, answers, and the client uses it (same pid), restarting nothing."""
    sb.buck("server")
    pid = sb.info()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        client = sb.spawn("server", "--json", env={buck.STOP_AT_ENV: "restart.1"})
        wait_for(lambda: stopped(client.pid), timeout=30, what="the client to time out and take lifecycle.lock")
    finally:
        os.kill(pid, signal.SIGCONT)
    r = finish(sb, client)
    assert r.code == 0 and json.loads(r.out)["pid"] == pid, r.err
    assert "restarting" not in r.err and "starting" not in r.err, r.err
    assert sb.status()["pid"] == pid and sb.one_daemon() == pid


@pytest.mark.parametrize("log", [True, False], ids=["log on", "log off"])
def test_a_client_whose_files_changed_on_disk_restarts_nothing(sb, tmp_path, log):
    """Issue 16: buck.py and buckd.py replaced on disk (an upgrade) while a client runs: that
    client (stopped meanwhile) never restarts the new version's buckd with its own version;
    it exits 1 in one line saying its files changed on disk, and the new buckd lives on.
    Whether or not the lifecycle log made it compute its version early."""
    script = copy_of_sources(tmp_path / "checkout")
    assert sb.buck("server", script=script).code == 0
    env = {buck.STOP_AT_ENV: "connect.1", **({} if log else {buck.LOG_ENV: None})}
    client = sb.spawn("server", script=script, env=env)
    wait_for(lambda: stopped(client.pid), what="the client to stop at connect.1")
    with open(script.parent / "buckd.py", "a") as f:
        f.write("# the next version\n")
    r = sb.buck("server", "--json", script=script)
    assert r.code == 0 and "version mismatch" in r.err, r.err
    new = json.loads(r.out)["pid"]
    r = finish(sb, client)
    assert r.code == 1 and one_line_error(r) and len(r.err.splitlines()) == 1, r.err
    assert "files changed on disk" in r.err
    assert alive(new) and sb.status()["pid"] == new and sb.one_daemon() == new


def test_an_idle_timeout_too_short_to_use_is_refused(sb):
    """Issue 16: BUCKD_IDLE_TIMEOUT=0.01 would end buckd before its client could use it: it is
    refused as a bad value (as every bad duration: `buck server` exits 1 with one line naming
    BUCKD_IDLE_TIMEOUT; `buck daemon`, whose setting it is, exits 2), and no buckd is left."""
    assert within(sb, "daemon", env={buck.IDLE_TIMEOUT_ENV: "0.01"}).code == 2
    r = within(sb, "server", env={buck.IDLE_TIMEOUT_ENV: "0.01"})
    assert r.code == 1 and one_line_error(r) and len(r.err.splitlines()) == 1, r.err
    assert buck.IDLE_TIMEOUT_ENV in r.err
    assert not sb.daemons()


def test_a_future_mtime_on_buckd_pid_is_not_waited_for(sb, decoy):
    """Issue 16: a buckd.pid with an mtime 10 hours ahead, held by a live buckd that buckd.info
    does not name (it names another pid and port): that is no buckd "starting a moment ago",
    and `buck server` does not wait for it for hours: it replaces it within seconds."""
    assert sb.buck("daemon", env={buck.CHECK_INTERVAL_ENV: "100"}).code == 0
    pid = sb.info()["pid"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                   # closed: no one answers there
    (sb.dir() / buck.INFO_FILE).write_text(json.dumps({**sb.info(), "pid": decoy.pid, "port": port}))
    future = time.time() + 10 * 3600
    os.utime(sb.dir() / buck.PID_FILE, (future, future))
    r = within(sb, "server", "--json", seconds=40)
    assert r.code == 0 and no_traceback(r), r.err
    assert json.loads(r.out)["pid"] not in (pid, decoy.pid) and not alive(pid)


# --- Why did my daemon restart? Every start explained, every daemon in view (issue 15)

def instance_of(info):
    """The mark buckd sets as BUCKD_INSTANCE for the processes its commands start."""
    return f"{info['pid']}@{info['start_time']!r}"


def restart_4s(sb):
    return [l for l in sb.lines() if l["step"] == "restart.4"]


def why_and_by(status):
    """(why, by whom) a buckd was started, from its status: `started_because` and `started_by`,
    or `started_because` alone, said "WHY (by pid N: COMMAND LINE)"."""
    if "started_by" in status:
        return status["started_because"], status["started_by"]
    why, _, by = status["started_because"].rpartition(" (by ")
    assert why and by.endswith(")"), status["started_because"]
    return why, by[:-1]


@pytest.fixture
def repos(sb):
    """make(name): another repository beside sb.repo, in sb's HOME. At teardown, before sb's
    own cleanup, its buckds are stopped: by `buck kill` while it is a repository, else by pid."""
    made = []

    def make(name):
        repo = sb.tmp / name
        repo.mkdir()
        (repo / buck.MARKER).write_text("")
        made.append(repo)
        return repo
    yield make
    for pid in sb.processes():
        if stopped(pid):
            os.kill(pid, signal.SIGCONT)
    for repo in made:
        for pid_file in (sb.home / buck.STATE_DIR / buck.DAEMON / str(repo).lstrip("/")).glob(f"*/{buck.PID_FILE}"):
            if lock_holder(pid_file) is None:
                continue
            if (repo / buck.MARKER).exists():
                sb.buck("--isolation-dir", pid_file.parent.name, "kill", cwd=repo)
            else:
                os.kill(lock_holder(pid_file), signal.SIGKILL)


def dir_of(sb, repo, isolation=buck.DEFAULT_ISOLATION):
    return sb.home / buck.STATE_DIR / buck.DAEMON / str(repo).lstrip("/") / isolation


@pytest.fixture
def spawning_buck(tmp_path):
    """A checkout whose workload has one more hidden command, `debug run -- ARGV...`: it runs
    ARGV in the client's cwd as a child of buckd and passes on its output and exit code (as a
    build's action would run a tool). Another version, as any edit makes one."""
    script = Path(lifecycle.copy_sources(BUCK, tmp_path / "spawning"))
    with open(script.parent / "workload.py", "a") as f:
        f.write('''

def cmd_debug_run(call):
    """`buck debug run -- ARGV...`: ARGV, run by buckd, as a tool run by a build would be."""
    import subprocess
    done = subprocess.run([os.fsdecode(a) for a in call.args], cwd=call.cwd, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    for kind, data in (("stdout", done.stdout), ("stderr", done.stderr)):
        if data:
            yield kind, data
    return done.returncode


COMMANDS["debug run"] = ("ARGV...", None, cmd_debug_run)
''')
    return script


def test_a_start_records_why_and_by_whom_everywhere(sb):
    """Claim: a client that starts buckd says why and who it is; buckd shows both in `status`
    (text and --json), at the top of buckd.stderr and in the lifecycle log's restart.4;
    `previous_end` says none is known the first time. The reason is not in buckd's argv
    (public in `ps`): its command line is the hidden `daemon` command alone."""
    r = sb.buck("server", "--json")
    why = f"no {buck.DAEMON} was running"
    assert r.code == 0 and r.err == f"{buck.TOOL}: starting {buck.DAEMON}: {why}\n", r.err
    status = json.loads(r.out)
    told, by = why_and_by(status)               # by: "pid N: <its command line>"
    assert by.startswith(f"pid {r.pid}: ") and by.endswith(" server --json"), by
    assert (told, status["previous_end"]) == (why, "none known")
    moving = {"uptime_s": 0, "idle_s": 0, "rss_bytes": 0, "peak_rss_bytes": 0, "cpu_s": 0}
    assert sb.status() | moving == status | moving
    text = sb.buck("status").out.splitlines()
    assert f"  started_because: {status['started_because']}" in text, text
    assert "started_by" not in status or f"  started_by: {by}" in text
    assert "  previous_end: none known" in text
    first = "\n".join((sb.dir() / buck.STDERR_FILE).read_text().splitlines()[:3])
    assert f"started because: {why} (by {by})" in first and f"the previous {buck.DAEMON}: none known" in first, first
    assert [(l["why"], l["exit"]) for l in restart_4s(sb)] == [(why, 0)]
    assert [l["reason"] for l in sb.lines() if l["step"] == "restart.2"] == [
        f"{buck.DAEMON} was restarted by pid {r.pid}: {why}"]
    argv = b" ".join(cmdline(status["pid"])).strip()
    assert argv.endswith(f"buck.py --isolation-dir {buck.DEFAULT_ISOLATION} daemon".encode()), argv
    assert b"running" not in argv, argv
    assert guarantees_hold(sb)


def test_commands_buckd_runs_inherit_its_mark_but_not_why_it_started(sb, spawning_buck):
    """Claim: buckd removes BUCKD_STARTED_BECAUSE from its environment, so the processes its
    commands start do not inherit it; they do inherit BUCKD_INSTANCE=<pid>@<start_time repr>,
    naming that very buckd (from its buckd.info)."""
    assert sb.buck("server", script=spawning_buck).code == 0
    show_env = [PY, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
    r = sb.buck("debug", "run", "--", *show_env, script=spawning_buck)
    assert r.code == 0, r.err
    env = json.loads(r.out)
    assert env[buck.INSTANCE_ENV] == instance_of(sb.info())
    assert buck.STARTED_ENV not in env
    assert env["HOME"] == str(sb.home)          # (the user's environment, otherwise)


@pytest.mark.parametrize("cause", ["version mismatch", "not usable", "corrupt info", "crashed",
                                   "vanished", "by hand"])
def test_every_start_says_why(sb, other_buck, cause):
    """Claim: each way a client comes to start buckd is the new buckd's started_because, as
    the client said it on stderr and in restart.4: a version mismatch (both versions), a
    buckd that is not usable (the RPC error), a corrupt buckd.info, a buckd that crashed or
    vanished (with how it ended); `buck daemon` run by hand says so. A buckd that a client
    had to signal has that client's record of who killed it and why, with the signal."""
    script, killed = BUCK, ()
    if cause != "by hand":
        sb.buck("server", env={buck.CHECK_INTERVAL_ENV: "100"})    # self-checks stay out of it
        old = sb.info()["pid"]
    if cause == "version mismatch":
        script = other_buck
        why = f"{buck.DAEMON} version mismatch (daemon {version_of()}, client {version_of(other_buck)})"
    elif cause == "not usable":
        (sb.dir() / buck.INFO_FILE).write_text(json.dumps({**sb.info(), "port": 1}))
        why = f"{buck.DAEMON} (pid {old}) is not usable (UNAVAILABLE: "
    elif cause == "corrupt info":
        (sb.dir() / buck.INFO_FILE).write_text("{not json")
        old_enough = time.time() - 60           # not "starting a moment ago": no 30 s wait
        os.utime(sb.dir() / buck.PID_FILE, (old_enough, old_enough))
        why = f"{buck.INFO_FILE} is corrupt"
    elif cause == "crashed":
        sb.buck("debug", "crash")
        wait_for(lambda: not alive(old))
        why = f"{buck.DAEMON} (pid {old}) crashed or vanished (pid {old} ended by panic: RuntimeError('`{buck.TOOL} debug crash` was invoked'))"
    elif cause == "vanished":
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: not alive(old))
        why, killed = f"{buck.DAEMON} (pid {old}) crashed or vanished (pid {old} vanished without a word (SIGKILL, or out of memory?))", (old,)
    if cause == "by hand":
        r = sb.buck("daemon")
        assert r.code == 0, r.err
        status = sb.status()
        said = " ".join([status["started_because"], status.get("started_by", "")])
        assert said.startswith(f"started by hand (`{buck.TOOL} daemon`") and f"pid {os.getpid()}" in said, said
        assert status["previous_end"] == "none known" and not restart_4s(sb)
        assert f"started because: {status['started_because']}" in (sb.dir() / buck.STDERR_FILE).read_text()
        return
    r = sb.buck("server", "--json", script=script)
    assert r.code == 0 and no_traceback(r), r.err
    status = json.loads(r.out)
    told, by = why_and_by(status)
    said = r.err.splitlines()[-1]
    assert said.removeprefix(f"{buck.TOOL}: starting {buck.DAEMON}: ").removeprefix(f"{buck.TOOL}: restarting {buck.DAEMON}: ") == told, r.err
    assert told.startswith(why) and by.startswith(f"pid {r.pid}: ") and by.endswith(" server --json"), by
    if cause == "not usable":
        assert told.endswith(")")
    assert restart_4s(sb)[-1]["why"] == told
    restart_2 = [l for l in sb.lines() if l["step"] == "restart.2" and l["pid"] == r.pid]
    assert restart_2[-1]["reason"] == f"{buck.DAEMON} was restarted by pid {r.pid}: {told}", restart_2
    assert f"started because: {told} (by {by})" in (sb.dir() / buck.STDERR_FILE).read_text()
    previous = {       # how the replaced buckd ended: the restarting client's record, or buckd's own
        "version mismatch": f"pid {old} ended by kill: {buck.DAEMON} was restarted by pid {r.pid}: {why}",
        "not usable": f"pid {old} ended by kill: {buck.DAEMON} was restarted by pid {r.pid}: {told} (SIGTERM)",
        "corrupt info": f"pid {old} ended by kill: {buck.DAEMON} was restarted by pid {r.pid}: {why} (SIGTERM)",
        "crashed": f"pid {old} ended by panic: RuntimeError('`{buck.TOOL} debug crash` was invoked')",
        "vanished": f"pid {old} vanished without a word (SIGKILL, or out of memory?)"}[cause]
    assert status["previous_end"] == previous
    assert guarantees_hold(sb, killed=killed)


@pytest.mark.parametrize("how", ["kill", "idle", "self-check", "signal", "panic", "repository gone", "vanished"])
def test_status_says_how_the_last_buckd_ended(sb, how):
    """Claim: buckd.end says how the last buckd ended ({"pid"} while it runs, then "how" and
    "why"); with none running `status` says it after `no buckd running`; the client that
    starts the next buckd says it; the new buckd shows it as previous_end and buckd.end moves
    to prev/ with the logs. SIGKILL leaves only the pid: "vanished without a word"."""
    sb.buck("server", env={buck.IDLE_TIMEOUT_ENV: "1"} if how == "idle" else {})
    d, pid, killed = sb.dir(), sb.info()["pid"], ()
    assert json.loads((d / buck.END_FILE).read_text()) == {"pid": pid}
    if how == "kill":
        k = sb.buck("kill")
        ended = f"ended by kill: `{buck.TOOL} kill` was invoked by pid {k.pid}"
    elif how == "idle":
        ended = f"ended by idle: no command for 1 s ({buck.IDLE_TIMEOUT_ENV})"
    elif how == "self-check":
        (d / buck.INFO_FILE).unlink()
        ended = f"ended by self-check: {buck.INFO_FILE} was removed or rewritten"
    elif how == "signal":
        os.kill(pid, signal.SIGTERM)
        ended = f"ended by signal: {buck.DAEMON} received SIGTERM"
    elif how == "panic":
        sb.buck("debug", "crash")
        ended = f"ended by panic: RuntimeError('`{buck.TOOL} debug crash` was invoked')"
    elif how == "repository gone":
        (sb.repo / buck.MARKER).unlink()
        ended = "ended by repository gone: "        # the why, from buckd.end below
    else:
        os.kill(pid, signal.SIGKILL)
        ended, killed = "vanished without a word (SIGKILL, or out of memory?)", (pid,)
    try:
        wait_for(lambda: not alive(pid), timeout=10, what=f"{buck.DAEMON} to end")
    finally:
        (sb.repo / buck.MARKER).write_text("")
    record = json.loads((d / buck.END_FILE).read_text())
    if how == "repository gone":
        assert str(sb.repo) in record["why"] and buck.MARKER in record["why"], record
        ended += record["why"]
    assert record == ({"pid": pid} if how == "vanished" else
                      {"pid": pid, "how": how, "why": ended.split(": ", 1)[1]})
    r = sb.buck("status")
    assert (r.code, r.out) == (0, f"no {buck.DAEMON} running\nthe last one, pid {pid} {ended}\n")
    as_json = sb.status()
    assert as_json["previous_end"] == f"pid {pid} {ended}"
    assert as_json["state"] == ("dead" if how in ("panic", "vanished") else "none")
    r = sb.buck("server", "--json")
    assert r.code == 0, r.err
    new = json.loads(r.out)
    if how in ("panic", "vanished"):
        assert f"{buck.TOOL}: starting {buck.DAEMON}: {buck.DAEMON} (pid {pid}) crashed or vanished (pid {pid} {ended})" in r.err.splitlines()
    else:
        assert r.err == f"{buck.TOOL}: starting {buck.DAEMON}: no {buck.DAEMON} was running (the last one, pid {pid} {ended})\n"
    assert new["previous_end"] == f"pid {pid} {ended}" and new["pid"] != pid
    assert json.loads((d / buck.PREV_DIR / buck.END_FILE).read_text()) == record
    assert json.loads((d / buck.END_FILE).read_text()) == {"pid": new["pid"]}
    assert f"the previous {buck.DAEMON}: pid {pid} {ended}" in (d / buck.STDERR_FILE).read_text()
    assert guarantees_hold(sb, killed=killed)


def test_idle_timeout_below_one_second_is_refused(sb):
    """Claim: BUCKD_IDLE_TIMEOUT is 0 (never) or at least 1 s: a shorter one is refused in
    one line and no buckd starts."""
    r = sb.buck("server", env={buck.IDLE_TIMEOUT_ENV: "0.5"})
    assert r.code == 1 and one_line_error(r) and buck.IDLE_TIMEOUT_ENV in r.err, r.err
    assert not sb.daemons()
    for accepted in ("1", "0"):                 # (`server` asks the buckd it started: it served)
        r = sb.buck("server", "--json", env={buck.IDLE_TIMEOUT_ENV: accepted})
        assert r.code == 0 and json.loads(r.out)["pid"], r.err
        sb.buck("kill")


def test_wedged_buckds_are_listed_and_their_killer_leaves_the_record(sb, repos):
    """Claim: `status --all` asks every buckd at once: with three buckds wedged (SIGSTOPped:
    each costs a Status timeout) among running ones it still ends within ~10 s (asked one by
    one they would take 15 s), showing those as not responding and the other as running.
    A buckd killed by a client's signals cannot write how it ended: the client writes it
    first (who, why, which signal)."""
    other, fine_repo = repos("other"), repos("fine")
    for args, cwd in (((), sb.repo), (("--isolation-dir", "x"), sb.repo), ((), other), ((), fine_repo)):
        assert sb.buck(*args, "server", cwd=cwd).code == 0
    wedged = {str(d): json.loads((d / buck.INFO_FILE).read_text())["pid"]
              for d in (sb.dir(), sb.dir("x"), dir_of(sb, other))}
    fine = json.loads((dir_of(sb, fine_repo) / buck.INFO_FILE).read_text())["pid"]
    for pid in wedged.values():
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    r = sb.buck("status", "--all", "--json", cwd=sb.tmp)
    took = time.monotonic() - start
    assert r.code == 0 and took < 15, (took, r.err)
    rows = {row["daemon_dir"]: row for row in json.loads(r.out)}
    assert {d: row["pid"] for d, row in rows.items()} == {**wedged, str(dir_of(sb, fine_repo)): fine}
    assert all(rows[d]["state"].startswith("not responding: DEADLINE_EXCEEDED") for d in wedged)
    assert rows[str(dir_of(sb, fine_repo))]["state"] == "running"
    start = time.monotonic()
    r = sb.buck("status", "--all", cwd=sb.tmp)
    assert r.code == 0 and time.monotonic() - start < 15
    lines = r.out.splitlines()
    assert all(f"{d}: not responding: DEADLINE_EXCEEDED: Deadline Exceeded (pid {pid})" in lines
               for d, pid in wedged.items()), lines
    assert any(line.startswith(f"{dir_of(sb, fine_repo)}: pid {fine}, ") for line in lines), lines
    k = sb.buck("kill")
    assert k.code == 0 and not alive(wedged[str(sb.dir())])
    assert sb.buck("status").out == (f"no {buck.DAEMON} running\nthe last one, pid {wedged[str(sb.dir())]} "
                                     f"ended by kill: `{buck.TOOL} kill` was invoked by pid {k.pid} (SIGTERM)\n")
    assert not (sb.dir() / buck.INFO_FILE).exists()       # the killer removed it: no "crash" next
    r = sb.buck("server")
    assert r.code == 0 and "crashed" not in r.err and "ended by kill" in r.err, r.err


def test_a_killer_never_overwrites_the_end_buckd_itself_recorded(sb):
    """A buckd that has recorded how it ends (here: idle) but not yet exited is killed by the
    next client's signals: the record still says idle, as the new buckd's previous_end does."""
    sb.buck("server", env={buck.IDLE_TIMEOUT_ENV: "1", buck.STOP_AT_ENV: "daemon.exit"})
    pid = sb.info()["pid"]
    wait_for(lambda: stopped(pid), what=f"{buck.DAEMON} to stop itself at daemon.exit, idle")
    old = time.time() - 60                      # not "starting a moment ago": no 30 s wait
    os.utime(sb.dir() / buck.PID_FILE, (old, old))
    r = sb.buck("server", "--json")
    assert r.code == 0 and not alive(pid), r.err
    assert json.loads(r.out)["previous_end"].startswith(f"pid {pid} ended by idle: no command for 1 s")


def test_status_all_lists_every_buckd_of_the_user_from_anywhere(sb, repos):
    """Claim: `status --all` (text and --json), run outside any repository, lists every buckd
    under $HOME/.buck/buckd, across repositories and isolation dirs: running ones with pid,
    version, uptime, running commands, idle time and why they started (--json: all status
    fields), dead ones (buckd.info naming no lock holder) as dead; a buckd that ended cleanly
    and a dir with no files are not listed. It starts nothing."""
    two, dead, gone = repos("two"), repos("dead"), repos("gone")
    assert sb.buck("status", cwd=sb.tmp).code == 1            # sb.tmp is in no repository
    for args, cwd in (((), sb.repo), (("--isolation-dir", "x"), sb.repo), ((), two), ((), dead), ((), gone)):
        assert sb.buck(*args, "server", cwd=cwd).code == 0
    running = {str(sb.dir()): sb.info()["pid"], str(sb.dir("x")): sb.info("x")["pid"],
               str(dir_of(sb, two)): json.loads((dir_of(sb, two) / buck.INFO_FILE).read_text())["pid"]}
    dead_pid = json.loads((dir_of(sb, dead) / buck.INFO_FILE).read_text())["pid"]
    os.kill(dead_pid, signal.SIGKILL)
    assert sb.buck("kill", cwd=gone).code == 0
    (sb.home / buck.STATE_DIR / buck.DAEMON / "nothing" / "here").mkdir(parents=True)
    wait_for(lambda: not alive(dead_pid))
    sleeper = sb.spawn("debug", "sleep", "300", cwd=two)
    assert sleeper.stdout.readline() == b"sleeping for 300 s\n"
    before = sorted(sb.processes())
    try:
        r = sb.buck("status", "--all", cwd=sb.tmp)
        j = sb.buck("status", "--all", "--json", cwd=sb.tmp)
    finally:
        sleeper.kill()
        sleeper.communicate()
    assert r.code == j.code == 0 and r.err == j.err == ""
    assert sorted(sb.processes()) == [p for p in before if p != sleeper.pid]
    lines = r.out.splitlines()
    assert len(lines) == 4 and f"{dir_of(sb, dead)}: dead (pid {dead_pid})" in lines, lines
    rows = {row["daemon_dir"]: row for row in json.loads(j.out)}
    import re
    for d, pid in running.items():
        active = 1 if d == str(dir_of(sb, two)) else 0
        pattern = (rf"{re.escape(d)}: pid {pid}, version {version_of()}, up [\d.]+ s, {active} running, "
                   rf"idle [\d.]+ s, started because: {re.escape(rows[d]['started_because'])}"
                   rf"(; pid \d+ runs {buck.TOOL} debug sleep \d+)?")
        assert any(re.fullmatch(pattern, line) for line in lines), (pattern, lines)
    assert set(rows) == {*running, str(dir_of(sb, dead))}
    assert rows[str(dir_of(sb, dead))] | {"previous_end": ""} == {
        "daemon_dir": str(dir_of(sb, dead)), "pid": dead_pid, "state": "dead", "previous_end": ""}
    assert rows[str(dir_of(sb, dead))]["previous_end"] == f"pid {dead_pid} vanished without a word (SIGKILL, or out of memory?)"
    fields = set(sb.status())
    for d, pid in running.items():
        assert set(rows[d]) == fields and rows[d]["state"] == "running" and rows[d]["pid"] == pid
        assert why_and_by(rows[d])[0] == f"no {buck.DAEMON} was running"
    assert rows[str(dir_of(sb, two))]["active_commands"] == 1
    assert guarantees_hold(sb, killed=(dead_pid,))


def test_status_all_with_no_buckd(sb):
    """Claim: with no buckd (none ever, or only ones that ended cleanly), `status --all`
    says `no buckd running` (--json: []), exit 0, outside a repository, starting nothing."""
    for _ in range(2):
        r = sb.buck("status", "--all", cwd=sb.tmp)
        j = sb.buck("status", "--all", "--json", cwd=sb.tmp)
        assert (r.code, r.out, j.code, j.out) == (0, f"no {buck.DAEMON} running\n", 0, "[]\n")
        assert not sb.processes()
        sb.buck("server")
        sb.buck("kill")


def test_status_all_shows_a_buckd_not_yet_named_in_buckd_info(sb):
    """Claim: a buckd that holds buckd.pid but has not written buckd.info yet is listed as
    "starting, not named in buckd.info yet", with its pid (the lock holder)."""
    launcher = sb.spawn("daemon", env={buck.STOP_AT_ENV: "daemon.locked"})
    pid = wait_for(lambda: sb.holder(), what=f"{buck.DAEMON} to lock {buck.PID_FILE}")
    wait_for(lambda: stopped(pid), what=f"{buck.DAEMON} to stop at daemon.locked")
    r = sb.buck("status", "--all", cwd=sb.tmp)
    j = sb.buck("status", "--all", "--json", cwd=sb.tmp)
    assert r.out == f"{sb.dir()}: starting, not named in {buck.INFO_FILE} yet (pid {pid})\n", r.out
    row, = json.loads(j.out)
    assert (row["daemon_dir"], row["pid"], row["state"]) == (str(sb.dir()), pid, f"starting, not named in {buck.INFO_FILE} yet")
    os.kill(pid, signal.SIGCONT)
    assert finish(sb, launcher).code == 0 and sb.status()["pid"] == pid
    assert guarantees_hold(sb)


def test_killall_stops_every_buckd_of_the_user_from_anywhere(sb, repos):
    """Claim: `killall`, outside any repository, stops every buckd of this user (several
    repositories and isolation dirs), printing `buckd killed (pid N) in DIR` for each, exit
    0; each records that killall ended it. Dead ones are skipped quietly."""
    two, dead = repos("two"), repos("dead")
    for args, cwd in (((), sb.repo), (("--isolation-dir", "x"), sb.repo), ((), two), ((), dead)):
        assert sb.buck(*args, "server", cwd=cwd).code == 0
    pids = {sb.dir(): sb.info()["pid"], sb.dir("x"): sb.info("x")["pid"],
            dir_of(sb, two): json.loads((dir_of(sb, two) / buck.INFO_FILE).read_text())["pid"]}
    dead_pid = json.loads((dir_of(sb, dead) / buck.INFO_FILE).read_text())["pid"]
    os.kill(dead_pid, signal.SIGKILL)
    wait_for(lambda: not alive(dead_pid))
    r = sb.buck("killall", cwd=sb.tmp)
    assert (r.code, r.err) == (0, ""), r.err
    assert sorted(r.out.splitlines()) == sorted(f"{buck.DAEMON} killed (pid {pid}) in {d}" for d, pid in pids.items())
    assert not any(alive(pid) for pid in pids.values()) and not sb.processes()
    for d, pid in pids.items():
        assert json.loads((d / buck.END_FILE).read_text()) == {
            "pid": pid, "how": "kill", "why": f"`{buck.TOOL} killall` was invoked by pid {r.pid}"}
    r = sb.buck("killall", cwd=sb.tmp)
    assert (r.code, r.out, r.err) == (0, "", "")
    assert guarantees_hold(sb, killed=(dead_pid,))


def test_killall_spares_the_buckd_running_the_caller_and_kill_does_not(sb, repos):
    """Claim: a `killall` run inside a buckd (as a nested client would run it: BUCKD_INSTANCE
    naming that buckd) kills every other buckd and spares that one, exit 0; an explicit
    `kill` with the same mark kills it."""
    two = repos("two")
    sb.buck("server")
    sb.buck("server", cwd=two)
    mine, other = sb.info(), json.loads((dir_of(sb, two) / buck.INFO_FILE).read_text())["pid"]
    mark = {buck.INSTANCE_ENV: instance_of(mine)}
    r = sb.buck("killall", cwd=sb.tmp, env=mark)
    assert (r.code, r.out, r.err) == (0, f"{buck.DAEMON} killed (pid {other}) in {dir_of(sb, two)}\n", "")
    assert not alive(other) and alive(mine["pid"]) and sb.status()["pid"] == mine["pid"]
    r = sb.buck("kill", env=mark)
    assert (r.code, r.out) == (0, f"{buck.DAEMON} killed (pid {mine['pid']})\n") and not alive(mine["pid"])


def test_a_nested_client_never_restarts_the_buckd_running_it(sb, other_buck):
    """Claim: a client carrying BUCKD_INSTANCE (given by hand, as a nested client would carry
    it) that would have to restart that very buckd (another version) fails in one line and
    the buckd lives on; a same-version nested client just uses it; a mark naming another
    buckd instance protects nothing."""
    sb.buck("server")
    info = sb.info()
    mark = {buck.INSTANCE_ENV: instance_of(info)}
    r = sb.buck("server", script=other_buck, env=mark)
    assert r.code == 1 and one_line_error(r) and r.err == (
        f"{buck.TOOL}: this command runs inside {buck.DAEMON} (pid {info['pid']}), which it would have to restart "
        f"({buck.DAEMON} version mismatch (daemon {version_of()}, client {version_of(other_buck)})): "
        f"refusing to kill the {buck.DAEMON} that runs it\n")
    assert alive(info["pid"]) and sb.one_daemon() == info["pid"] and sb.info() == info
    r = sb.buck("server", "--json", env=mark)
    assert r.code == 0 and r.err == "" and json.loads(r.out)["pid"] == info["pid"]
    assert sb.buck("debug", "sleep", "0", env=mark).code == 0
    stale = {buck.INSTANCE_ENV: f"{info['pid']}@{info['start_time'] + 1!r}"}   # an earlier buckd's
    r = sb.buck("server", "--json", script=other_buck, env=stale)
    assert r.code == 0 and json.loads(r.out)["pid"] != info["pid"] and not alive(info["pid"])
    assert guarantees_hold(sb)


def test_a_real_nested_client_spares_its_buckd(sb, repos, spawning_buck):
    """Claim, with a real nested client (run by a command in buckd, inheriting its mark):
    another version's client refuses to restart that buckd, one line, and it lives on;
    a same-version one uses it; `killall` kills every buckd but that one."""
    two = repos("two")
    sb.buck("server", script=spawning_buck)
    sb.buck("server", cwd=two)
    info, other = sb.info(), json.loads((dir_of(sb, two) / buck.INFO_FILE).read_text())["pid"]
    r = sb.buck("debug", "run", "--", PY, BUCK, "server", script=spawning_buck)
    assert r.code == 1 and one_line_error(r), r.err
    assert r.err.endswith(f"(pid {info['pid']}), which it would have to restart ({buck.DAEMON} version mismatch "
                          f"(daemon {version_of(spawning_buck)}, client {version_of()})): "
                          f"refusing to kill the {buck.DAEMON} that runs it\n"), r.err
    assert alive(info["pid"]) and sb.info() == info
    r = sb.buck("debug", "run", "--", PY, spawning_buck, "server", "--json", script=spawning_buck)
    assert r.code == 0 and json.loads(r.out)["pid"] == info["pid"], r.err
    r = sb.buck("debug", "run", "--", PY, spawning_buck, "killall", script=spawning_buck)
    assert (r.code, r.out) == (0, f"{buck.DAEMON} killed (pid {other}) in {dir_of(sb, two)}\n"), r.err
    assert not alive(other) and alive(info["pid"]) and sb.info() == info
    assert guarantees_hold(sb)


def test_buckd_is_named_after_its_repository_in_ps(sb, repos):
    """Claim: buckd's process name (/proc/PID/comm, what `ps`, `top` and `pgrep` show) is
    `buckd[<repository dir name>]`, cut to 15 bytes."""
    long = repos("a-very-long-repository-name")
    sb.buck("server")
    sb.buck("server", cwd=long)
    pids = [sb.info()["pid"], json.loads((dir_of(sb, long) / buck.INFO_FILE).read_text())["pid"]]
    comms = [Path(f"/proc/{pid}/comm").read_bytes() for pid in pids]
    assert comms == [f"{buck.DAEMON}[{name}]".encode()[:15] + b"\n" for name in ("repo", long.name)]
    if shutil.which("pgrep"):
        found = subprocess.run(["pgrep", buck.DAEMON], capture_output=True, text=True).stdout.split()
        assert {str(pid) for pid in pids} <= set(found), found


@pytest.mark.parametrize("change", ["repository removed", "marker removed", "repository renamed"])
def test_buckd_exits_when_its_repository_is_gone(sb, repos, change):
    """Claim: at its periodic self-check buckd exits when its repository root or the root's
    .buckconfig is gone, recording `repository gone`; it removes its buckd.info, so
    `status --all` no longer lists it. A buckd of another repository lives on."""
    doomed = repos("doomed")
    sb.buck("server")
    sb.buck("server", cwd=doomed)
    d = dir_of(sb, doomed)
    pid, survivor = json.loads((d / buck.INFO_FILE).read_text())["pid"], sb.info()["pid"]
    if change == "repository removed":
        shutil.rmtree(doomed)
    elif change == "marker removed":
        (doomed / buck.MARKER).unlink()
    else:
        doomed.rename(sb.tmp / "moved")
    wait_for(lambda: not alive(pid), timeout=10, what=f"{buck.DAEMON} to notice its repository is gone")
    record = json.loads((d / buck.END_FILE).read_text())
    assert (record["pid"], record["how"]) == (pid, "repository gone")
    assert str(doomed) in record["why"] and buck.MARKER in record["why"], record
    assert not (d / buck.INFO_FILE).exists()
    shutdown = [l for l in sb.lines() if l["pid"] == pid and l["step"] == "daemon.shutdown"]
    assert [l["path"] for l in shutdown] == ["repository gone"]
    r = sb.buck("status", "--all", "--json", cwd=sb.tmp)
    assert [row["pid"] for row in json.loads(r.out)] == [survivor] and alive(survivor)
    assert guarantees_hold(sb)


# --- Issue 20: status is not use, settings take effect, killall is bounded, status shows what
# runs; and the fault hunt's repros. Each failed before the behaviour was built ("Done means:
# each point above has a test that fails on today's main").

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


def test_out_of_file_descriptors_is_never_no_buckd(sb):
    """Out of file descriptors, a client cannot ask the kernel who holds buckd.pid: `holder`
    says so (EMFILE), never "no buckd", on which killall reported success having killed nothing
    (a review of 1.1.0, with `ulimit -n 60` and 100 buckds)."""
    assert sb.buck("server").code == 0
    probe = ("import errno, os, sys\nsys.path.insert(0, sys.argv[2])\nimport buckd\nfds = []\n"
             "try:\n    while True:\n        fds.append(os.open(os.devnull, os.O_RDONLY))\n"
             "except OSError:\n    pass\ntry:\n    print(buckd.holder(sys.argv[1]))\n"
             "except OSError as e:\n    print(errno.errorcode[e.errno])")
    r = subprocess.run([PY, "-c", probe, str(sb.dir()), str(HERE)], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout, r.stderr) == (0, "EMFILE\n", ""), r
    assert buckd.holder(sb.dir()) == sb.info()["pid"]


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
    """Issue 20, 5h: "`.buckconfig` rewritten by delete-then-create (as some editors and
    checkouts do) leaves a gap; a self-check landing in it ends buckd as 'repository gone'".
    Gone means gone for MARKER_GRACE across checks: a marker missing for half of it, over ten
    checks (a longer gap than any editor's), never ends buckd."""
    env = {CHECK: "0.05"}
    assert sb.buck("server", env=env).code == 0
    pid, marker = sb.info()["pid"], sb.repo / buck.MARKER
    marker.unlink()
    time.sleep(buckd.MARKER_GRACE / 2)          # the gap itself, not a synchronisation
    marker.write_text("")
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
