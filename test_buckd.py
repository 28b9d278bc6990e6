"""The evidence that buckd keeps ../shared/design/buckd.md, claim by claim.

Every test drives real processes: `buck.py` clients starting a real buckd, each test in a
HOME and repository of its own. Nothing is mocked and nothing sleeps to synchronise: we
poll for conditions with deadlines. At teardown `buck kill` stops the test's daemons; any
process still carrying the test's HOME is then killed by pid and fails the test.
"""
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent
BUCK = HERE / "buck.py"
PY = sys.executable
STDLIB = Path(os.__file__).parent
SMALL_TREES = [STDLIB / "email", STDLIB / "json", STDLIB / "concurrent"]   # real, not ours


def wait_for(condition, timeout=15.0, what="the condition"):
    """Poll until condition() is truthy and return it; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


class Sandbox:
    """A HOME and a repository (a dir with .buckconfig) of one test's own."""

    def __init__(self, tmp):
        self.tmp, self.home, self.repo = tmp, tmp / "home", tmp / "repo"
        self.home.mkdir()
        self.repo.mkdir()
        (self.repo / ".buckconfig").write_text("")
        self.env = {**os.environ, "HOME": str(self.home), "BUCKD_CHECK_INTERVAL": "0.2"}

    def dir(self, isolation="v2"):
        return self.home / ".buck" / "buckd" / str(self.repo).lstrip("/") / isolation

    def spawn(self, *args, script=BUCK, cwd=None, **kw):
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen([PY, str(script), *map(str, args)], cwd=cwd or self.repo,
                                env=kw.pop("env", self.env), stdin=subprocess.DEVNULL, **kw)

    def buck(self, *args, timeout=60, **kw):
        """Run a client to its end: code, out and err (text; rawout and rawerr: bytes)."""
        proc = self.spawn(*args, **kw)
        out, err = proc.communicate(timeout=timeout)
        return result(proc, out, err)

    def info(self, isolation="v2"):
        return json.loads((self.dir(isolation) / "buckd.info").read_text())

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
        return wait_for(lambda: len(d := self.daemons()) == 1 and d[0], what="exactly one buckd")

    def cleanup(self):
        for d in self.dir().parent.glob("*/buckd.pid"):
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
    return SimpleNamespace(code=proc.returncode, pid=proc.pid, rawout=out, rawerr=err,
                           out=out.decode(errors="replace"), err=err.decode(errors="replace"))


@pytest.fixture
def sb(tmp_path):
    sandbox = Sandbox(tmp_path)
    yield sandbox
    sandbox.cleanup()


@pytest.fixture
def other_buck(tmp_path):
    """A second checkout whose code differs by one comment: another buck version."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("buck.py", "buckd.py", "daemon.proto", "daemon_pb2.py", "daemon_pb2_grpc.py"):
        shutil.copy(HERE / name, other / name)
    with open(other / "buckd.py", "a") as f:
        f.write("# another version\n")
    return other / "buck.py"


def version_of(script=BUCK):
    return subprocess.run([PY, str(script), "version"], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def no_traceback(r):
    """No traceback of the client's own (a dead daemon's, quoted as "  | ...", is fine)."""
    assert not any(line.startswith("Traceback") for line in r.err.splitlines()), r.err
    return True


# --- Commands that need no daemon

@pytest.mark.parametrize("args, code, stream", [
    (["help"], 0, "out"), (["-h"], 0, "out"), (["--help"], 0, "out"), ([], 2, "err")])
def test_help_needs_no_daemon(sb, args, code, stream):
    '''"There's a small set of commands/arguments that don't require the daemon (`buck
    help`, cli arg parse failures, `buck version`, ...)".'''
    r = sb.buck(*args)
    assert r.code == code and "usage: buck" in getattr(r, stream) and "hash PATH" in getattr(r, stream)
    assert "  daemon" not in r.out and "  debug" not in r.out      # hidden commands
    assert not (sb.home / ".buck").exists()


@pytest.mark.parametrize("args", [
    ["frobnicate"], ["status", "--bogus"], ["hash"], ["--isolation-dir", "../x", "status"],
    ["debug", "sleep", "soon"], ["kill", "extra"]])
def test_argument_errors_exit_2_without_daemon(sb, args):
    '''"cli arg parse failures" need no daemon: usage on stderr, exit 2, no traceback.'''
    r = sb.buck(*args)
    assert r.code == 2 and "usage: buck" in r.err and no_traceback(r)
    assert not (sb.home / ".buck").exists()


def test_version_and_help_import_no_grpc(sb):
    '''`buck version` needs no daemon, and is fast: it never imports grpc.'''
    for args in (["version"], ["help"]):
        proc = subprocess.run([PY, "-X", "importtime", str(BUCK), *args], cwd=sb.repo, env=sb.env,
                              capture_output=True, text=True)
        assert proc.returncode == 0
        assert "grpc" not in proc.stderr and "daemon_pb2" not in proc.stderr
    r = sb.buck("version")
    assert r.out.startswith("buck ") and len(r.out.split()) == 2 and not (sb.home / ".buck").exists()


def test_version_is_derived_from_the_code(other_buck):
    '''"buck requires that the client and server are the same version": any edit of the
    code is a new version, like a new buck build.'''
    assert version_of() != version_of(other_buck)
    assert version_of() == version_of()


def test_outside_a_repository_fails_clearly(sb):
    '''"a directory in `$HOME/.buck` specific to that repository": with no repository (no
    .buckconfig in the cwd or above) there is no daemon dir, and we say so.'''
    r = sb.buck("server", cwd=sb.tmp)
    assert r.code == 1 and "not in a buck repository" in r.err and no_traceback(r)


@pytest.mark.parametrize("home", ["file", "unset"])
def test_unusable_home_fails_clearly(sb, home):
    '''"a directory in `$HOME/.buck`": a HOME that is a file, or none, is one line of error,
    not a traceback.'''
    env = dict(sb.env)
    if home == "file":
        (sb.tmp / "file").write_text("")
        env["HOME"] = str(sb.tmp / "file")
    else:
        del env["HOME"]
    r = sb.buck("server", env=env)
    assert r.code == 1 and r.err.startswith("buck: ") and no_traceback(r)
    assert len(r.err.strip().splitlines()) == 1, r.err


def test_missing_stubs_say_how_to_fix(sb, tmp_path):
    '''"The buckd server exposes a simple grpc service": without the generated stubs the
    client says how to build them.'''
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("buck.py", "buckd.py", "daemon.proto"):
        shutil.copy(HERE / name, bare / name)
    r = sb.buck("server", script=bare / "buck.py")
    assert r.code == 1 and "make setup" in r.err and no_traceback(r)


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
    assert (d / "buckd.pid").read_text().strip() == str(pid)
    fd = os.open(d / "buckd.pid", os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == str(d / "buckd.stdout")
    assert os.readlink(f"/proc/{pid}/fd/2") == str(d / "buckd.stderr")
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.getsid(pid) != os.getsid(0) and os.getsid(pid) != pid   # detached, no leader
    assert sb.status()["pid"] == pid


def test_second_daemon_fails_fast_naming_the_running_one(sb):
    '''"The file is locked exclusively by the daemon process until it exits. This means
    that only a single daemon is allowed at a time."'''
    pid = json.loads(sb.buck("server", "--json").out)["pid"]
    log = (sb.dir() / "buckd.stderr").read_text()
    r = sb.buck("daemon", timeout=10)
    assert r.code == 3 and "already running" in r.err and f"pid {pid}" in r.err
    assert sb.status()["pid"] == pid and sb.one_daemon() == pid
    assert (sb.dir() / "buckd.stderr").read_text().startswith(log)   # its log not clobbered


def test_files_are_private_and_bind_is_loopback(sb):
    """buckd.info holds a secret: the daemon dir and its files are the user's alone, and
    the port is served on 127.0.0.1 only."""
    sb.buck("server")
    d = sb.dir()
    assert d.stat().st_mode & 0o777 == 0o700
    for name in ("buckd.pid", "buckd.info", "lifecycle.lock", "buckd.stdout", "buckd.stderr"):
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
        for metadata in (None, (("buckd-token", "0" * 32),)):
            for call, request in ((stub.Status, pb.StatusRequest()), (stub.Kill, pb.KillRequest())):
                with pytest.raises(grpc.RpcError) as e:
                    call(request, metadata=metadata, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Command(iter([pb.CommandRequest(name="debug-crash")] * 2),
                                 metadata=metadata, timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Status(pb.StatusRequest(), metadata=(("buckd-token", info["auth_token"]),))
        assert reply.pid == info["pid"] and alive(info["pid"])


def test_command_runs_only_after_the_clients_go_ahead(sb):
    """A command runs at most once: buckd answers `accepted` and runs it only once the
    client confirms it saw that answer. Without the go-ahead, nothing runs."""
    import grpc
    sys.path.insert(0, str(HERE))
    import daemon_pb2 as pb, daemon_pb2_grpc as pb_grpc
    (sb.repo / "f").write_text("x")
    sb.buck("server")
    info = sb.info()
    with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
        request = pb.CommandRequest(name="hash", args=[b"f"], cwd=bytes(sb.repo))
        events = list(pb_grpc.DaemonApiStub(channel).Command(
            iter([request]), metadata=(("buckd-token", info["auth_token"]),), timeout=30))
    assert [e.WhichOneof("event") for e in events] == ["accepted"]
    assert sb.status()["files_read"] == 0


# --- Client connection and buckd startup

def test_start_when_none_then_reuse(sb):
    '''"If there is an error during 1-3 ... the client needs to (re)start the buck daemon.
    Otherwise, the client can continue as it now has made a connection with a correctly
    versioned buckd."'''
    first = sb.buck("server", "--json")
    assert first.code == 0 and "starting buckd" in first.err
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
    assert (r.code, r.out) == (0, "no buckd running\n") and not sb.processes()
    sb.buck("server")
    r = sb.buck("status")
    assert r.code == 0 and f"pid: {sb.info()['pid']}" in r.out


def test_kill_with_and_without_a_daemon(sb):
    '''Shutdown path 1: "The grpc api includes a `kill()` call that will shutdown buckd."'''
    r = sb.buck("kill")
    assert (r.code, r.out) == (0, "no buckd running\n")
    sb.buck("server")
    pid = sb.info()["pid"]
    r = sb.buck("kill")
    assert (r.code, r.out) == (0, f"buckd killed (pid {pid})\n") and not alive(pid)
    assert not (sb.dir() / "buckd.info").exists()      # a clean exit removes it
    assert sb.buck("status").out == "no buckd running\n"
    r = sb.buck("server", "--json")
    assert "starting buckd" in r.err and json.loads(r.out)["pid"] != pid


def test_version_mismatch_restarts(sb, other_buck):
    '''"For almost all commands, buck requires that the client and server are the same
    version of buck and may restart buckd to ensure that's the case."'''
    old = json.loads(sb.buck("server", "--json").out)
    r = sb.buck("server", "--json", script=other_buck)
    assert r.code == 0, r.err
    new = json.loads(r.out)
    assert f"buckd version mismatch (daemon {version_of()}, client {version_of(other_buck)})" in r.err
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
        (d / "buckd.info").unlink()
    elif change == "info rewritten":
        (d / "buckd.info").write_text(json.dumps({**sb.info(), "port": 1}))
    elif change == "pid rewritten":
        (d / "buckd.pid").write_text("1\n")
    elif change == "pid file deleted":
        (d / "buckd.pid").unlink()
    else:
        shutil.rmtree(d)
    wait_for(lambda: not alive(pid), what="buckd to exit")
    r = sb.buck("server", "--json")
    assert r.code == 0 and json.loads(r.out)["pid"] != pid


def test_crash_exits_and_is_reported(sb):
    """Shutdown path 3: "If buckd hits a rust `panic()` the buckd process will exit"."""
    sb.buck("server")
    pid = sb.info()["pid"]
    r = sb.buck("debug", "crash")
    assert r.code == 1 and no_traceback(r)
    assert f"lost buckd (pid {pid})" in r.err and "RuntimeError" in r.err
    assert "starting buckd" not in r.err                 # the command was not re-sent
    wait_for(lambda: not alive(pid))
    assert "Traceback" in (sb.dir() / "buckd.stderr").read_text()
    r = sb.buck("server", "--json")
    assert r.code == 0 and "buckd crashed, see" in r.err and "RuntimeError" in r.err
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
        assert sum("starting buckd" in r.err for r in results) == 1
        assert sb.buck("kill").code == 0 and not sb.daemons()


def test_race_clients_wait_for_lifecycle_lock_and_reuse(sb):
    """Guarantee 2: "Only a single client is killing/starting a buckd at a time": clients
    that find lifecycle.lock taken wait, say for whom, then use the daemon it started."""
    d = sb.dir()
    d.mkdir(parents=True)
    fd = os.open(d / "lifecycle.lock", os.O_RDWR | os.O_CREAT, 0o600)
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
    assert not any("starting buckd" in log.read_text() for log in logs)


def test_race_two_versions_never_use_a_mismatched_daemon(sb, other_buck):
    """Guarantee 3: "A client **will not** use a server with a mismatched version": clients
    of two versions racing either report a daemon of their own version or fail saying why."""
    versions = {BUCK: version_of(), other_buck: version_of(other_buck)}
    scripts = [BUCK, other_buck] * 6
    clients = [sb.spawn("server", "--json", script=s) for s in scripts]
    results = [result(c, *c.communicate(timeout=180)) for c in clients]
    for script, r in zip(scripts, results):
        assert no_traceback(r)
        if r.code == 0:
            assert json.loads(r.out)["version"] == versions[script]
        else:
            assert r.err.strip().splitlines()[-1].startswith("buck: "), r.err
    assert any(r.code == 0 for r in results)
    sb.one_daemon()


def test_race_client_killed_holding_lifecycle_lock(sb):
    """A client that dies while it holds lifecycle.lock (flock: released when the holder
    exits) does not block the next one."""
    client = sb.spawn("server", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = sb.dir() / "lifecycle.lock"
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


# --- Faults

def test_sigkilled_daemon_leaves_stale_files_that_are_survived(sb):
    '''"If there is an error during 1-3 ... the client needs to (re)start the buck daemon":
    a SIGKILLed buckd leaves buckd.info and buckd.pid behind; they are survived.'''
    sb.buck("server")
    pid = sb.info()["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid))
    assert (sb.dir() / "buckd.info").exists()
    assert sb.buck("status").out == "no buckd running\n"
    r = sb.buck("server", "--json")
    assert r.code == 0 and "buckd crashed, see" in r.err and json.loads(r.out)["pid"] != pid


@pytest.mark.parametrize("content", ["{not json", "", "truncated", '{"pid": "x"}'])
def test_corrupt_info_is_survived(sb, content):
    '''"read the "buckd.info" file to get the port": if it cannot be read (corrupt, empty,
    truncated), that is "an error during 1-3", and buckd is restarted.'''
    sb.buck("server")
    info_path, pid = sb.dir() / "buckd.info", sb.info()["pid"]
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
        (sb.dir() / "buckd.info").write_text(json.dumps({
            "pid": os.getpid(), "port": silent.getsockname()[1], "version": "x",
            "auth_token": "t", "start_time": 0}))
        r = sb.buck("status", timeout=30)
        assert r.code == 1 and "not responding" in r.err and no_traceback(r)
        r = sb.buck("server", "--json", timeout=30)
        assert r.code == 0, r.err
        assert json.loads(r.out)["port"] != silent.getsockname()[1]


def test_wedged_daemon_is_killed_as_a_last_resort(sb):
    """"ensure the buckd process has exited (based on pid)": a buckd that does not answer
    the kill call (here: stopped) is SIGKILLed, as it provably holds buckd.pid."""
    sb.buck("server")
    pid = sb.info()["pid"]
    os.kill(pid, signal.SIGSTOP)
    r = sb.buck("kill", timeout=60)
    assert (r.code, r.out) == (0, f"buckd killed (pid {pid})\n") and not alive(pid)


def test_stale_pid_file_naming_a_live_process_never_gets_it_killed(sb):
    """Only the holder of the buckd.pid lock is buckd: a stale file naming a reused pid
    must not get an unrelated process killed."""
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        sb.dir().mkdir(parents=True)
        (sb.dir() / "buckd.pid").write_text(f"{bystander.pid}\n")
        (sb.dir() / "buckd.info").write_text(json.dumps({
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


def test_ctrl_c_stops_hashing_a_big_file_midway(sb):
    """Cancellation reaches into the hashing of one big file (8 GB, sparse): the digest is
    never finished, so files_read stays 0."""
    sb.buck("server")
    with open(sb.repo / "big", "wb") as f:
        f.truncate(8 << 30)
    client = sb.spawn("hash", "big")
    wait_for(lambda: sb.status()["active_commands"] == 1)
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=10) == 130
    wait_for(lambda: sb.status()["active_commands"] == 0)
    assert sb.status()["files_read"] == 0


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


def test_hash_piped_into_head_stops_quietly(sb):
    '''"Most work is done by the daemon process": `buck hash | head -1` ends quietly, and
    the rest of the command is cancelled in buckd.'''
    sb.buck("server")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", f"{PY} {BUCK} hash {STDLIB} | head -1"],
                       cwd=sb.repo, env=sb.env, capture_output=True, timeout=120)
    assert r.returncode == 128 + signal.SIGPIPE and r.stderr == b""
    assert len(r.stdout.splitlines()) == 1
    wait_for(lambda: sb.status()["active_commands"] == 0)


@pytest.mark.parametrize("killer", ["buck kill", "other version"])
def test_kill_during_a_command_tells_the_client_why(sb, other_buck, killer):
    '''"If there are other invocations currently using the buck daemon when it is killed or
    restarted by a client, those invocations will fail due to the early disconnection."'''
    sb.buck("server")
    client = sb.spawn("debug", "sleep", "300")
    client.stdout.readline()
    k = sb.buck("kill") if killer == "buck kill" else sb.buck("server", script=other_buck)
    r = result(client, *client.communicate(timeout=20))
    assert r.code == 1 and no_traceback(r)
    if killer == "buck kill":
        assert f"buckd shut down during the command: `buck kill` was invoked by pid {k.pid}" in r.err
    else:
        assert f"buckd was restarted by pid {k.pid}" in r.err


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
    assert r.code == 1 and f"lost buckd (pid {pid}) during the command" in r.err
    assert str(sb.dir() / "buckd.stderr") in r.err
    assert ("RuntimeError" in r.err) == (death == "crash")


def sha256sum(paths, cwd):
    return subprocess.run(["sha256sum", "--", *paths], cwd=cwd, capture_output=True).stdout


def files_under(top):
    found = subprocess.run(["find", str(top), "-type", "f", "-print0"], capture_output=True).stdout
    return sorted(found.split(b"\0")[:-1])


def test_hash_equals_sha256sum_on_real_trees_and_warm_reads_nothing(sb):
    '''"Buck runs a persistent daemon process (buckd) to reuse work between commands":
    `hash` prints what sha256sum prints, and a warm run reads no file contents.'''
    sb.buck("server")
    r = sb.buck("hash", *SMALL_TREES, STDLIB / "os.py")
    expected = sha256sum([f for t in SMALL_TREES for f in files_under(t)] + [bytes(STDLIB / "os.py")], "/")
    assert r.code == 0 and r.rawout == expected and r.rawerr == b""
    read = sb.status()["files_read"]
    assert read == len(expected.splitlines())
    assert sb.buck("hash", *SMALL_TREES, STDLIB / "os.py").rawout == expected
    assert sb.status()["files_read"] == read     # warm: stats only, no file contents read


def test_hash_odd_names(sb):
    '''`hash` output is sha256sum's, byte for byte, for names with spaces, newlines,
    backslashes, carriage returns and bytes that are not UTF-8; `sha256sum -c` accepts it.'''
    names = [b"plain", b"with space", b"new\nline", b"back\\slash", b"car\rriage",
             b"not utf8 \xff\xfe", b"-dash"]
    tree = sb.repo / "odd"
    tree.mkdir()
    for i, name in enumerate(names):
        with open(os.path.join(bytes(tree), name), "wb") as f:
            f.write(b"x" * i)
    sb.buck("server")
    args = [os.fsdecode(b"odd/" + n) for n in names]
    r = sb.buck("hash", "odd", *args)
    assert r.code == 0, r.err
    assert r.rawout == sha256sum(sorted(b"odd/" + n for n in names) + [b"odd/" + n for n in names], sb.repo)
    check = subprocess.run(["sha256sum", "-c", "--quiet", "-"], input=r.rawout, cwd=sb.repo,
                           capture_output=True)
    assert check.returncode == 0, check.stderr


def test_hash_paths_are_relative_to_the_clients_cwd(sb):
    '''The daemon's cwd is "/": relative paths are the client's, resolved against its cwd.'''
    sub = sb.repo / "a" / "b"
    sub.mkdir(parents=True)
    (sub / "x.txt").write_text("x")
    (sb.repo / "a" / "y.txt").write_text("y")
    r = sb.buck("hash", "x.txt", "../y.txt", ".", cwd=sub)
    assert r.code == 0, r.err
    assert r.rawout == sha256sum([b"x.txt", b"../y.txt", b"./x.txt"], sub)


def test_hash_errors_and_exit_codes(sb):
    '''A missing path is reported as sha256sum does; the others are still hashed; exit 1.'''
    sb.buck("server")
    (sb.repo / "ok").write_text("ok")
    r = sb.buck("hash", "missing", "ok")
    assert r.code == 1
    assert r.err == "buck hash: missing: No such file or directory\n"
    assert r.rawout == sha256sum([b"ok"], sb.repo)
    assert sb.buck("debug", "sleep", "0").code == 0


def test_hash_cache_is_never_stale(sb):
    """The digest cache is keyed by (device, inode, size, mtime, ctime), and entries hashed
    too soon after a change ("racy") are not trusted."""
    sb.buck("server")
    f = sb.repo / "f"
    f.write_bytes(b"a" * 100)
    assert sb.buck("hash", "f").rawout == sha256sum([b"f"], sb.repo)
    assert sb.status()["cache_entries"] == 0     # racy: hashed right after a change
    st = f.stat()
    wait_for(lambda: time.time_ns() > max(st.st_mtime_ns, st.st_ctime_ns) + 2.1e9,
             what="the file to be older than the racy window")
    assert sb.buck("hash", "f").rawout == sha256sum([b"f"], sb.repo)
    assert sb.status()["cache_entries"] == 1     # now trusted
    f.write_bytes(b"b" * 100)                    # same size, same mtime: only ctime tells
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert sb.buck("hash", "f").rawout == sha256sum([b"f"], sb.repo)
