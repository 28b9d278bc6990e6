#!/usr/bin/env python3
"""buck: the client of buckd, the buck daemon. The spec is buck2's daemon_lifecycle.md
(https://github.com/facebook/buck2/blob/main/app/buck2_daemon/daemon_lifecycle.md); comments
quote its sections. `help`, `version` and argument errors need no daemon and no grpc; slow
imports (json, subprocess, grpc) happen where needed, so `help` starts as fast as Python.
"""
import os
import sys
import time

# --- The names a vendoring user changes (README, "Vendoring"): here, once; buckd.py imports
# them. Renaming TOOL and DAEMON renames everything else.
TOOL, DAEMON = "buck", "buckd"          # the command and its daemon, in messages and usage
SOURCES = ("buck.py", "buckd.py", "daemon.proto")   # the version: a checksum of these files
STATE_DIR = f".{TOOL}"                  # daemon dirs: $HOME/.buck/buckd/<repo root>/<isolation>
MARKER = f".{TOOL}config"               # .buckconfig: marks a repository's root
DEFAULT_ISOLATION = "v2"                # the isolation dir when --isolation-dir is not given
PID_FILE, INFO_FILE = f"{DAEMON}.pid", f"{DAEMON}.info"            # buckd.pid, buckd.info
STDOUT_FILE, STDERR_FILE = f"{DAEMON}.stdout", f"{DAEMON}.stderr"  # buckd.stdout, buckd.stderr
LOCK_FILE, PREV_DIR = "lifecycle.lock", "prev"
TOKEN_KEY = f"{DAEMON}-token"           # buckd-token: the gRPC metadata with buckd's token
CHECK_INTERVAL_ENV = f"{DAEMON.upper()}_CHECK_INTERVAL"    # BUCKD_CHECK_INTERVAL
IDLE_TIMEOUT_ENV = f"{DAEMON.upper()}_IDLE_TIMEOUT"        # BUCKD_IDLE_TIMEOUT
LOG_ENV = f"{TOOL.upper()}_LIFECYCLE_LOG"                  # BUCK_LIFECYCLE_LOG
STOP_AT_ENV = f"{TOOL.upper()}_LIFECYCLE_STOP_AT"          # BUCK_LIFECYCLE_STOP_AT

# --- The commands, once: their usage and their parser are made from this table. "[--x]" is
# a flag, "[--x=V]" an option with a value, "P" an operand, "P..." one or more, "[P...]" any
# number; no help text: hidden. Those not in LOCAL_COMMANDS run in buckd's HANDLERS[name].
COMMANDS = {
    "help": ("", "show this message"),
    "version": ("", "print this client's version"),
    "status": ("[--json]", f"report the running {DAEMON}; never starts one"),
    "server": ("[--json]", f"make sure a {DAEMON} of this version runs, then report it"),
    "kill": ("", f"stop the running {DAEMON}"),
    "hash": ("PATH...", f"print SHA-256 digests as sha256sum does, computed and cached by {DAEMON}"),
    "daemon": ("[--foreground]", None),
    "debug sleep": ("SECONDS", None),
    "debug crash": ("", None),
}
USAGE_LINE = f"{TOOL} [--isolation-dir NAME] COMMAND ..."

EXIT_FAILED, EXIT_USAGE = 1, 2          # a failure, said in one line; bad arguments
EXIT_ALREADY_RUNNING = 3                # `buck daemon`: another buckd holds buckd.pid
EXIT_PANIC = 101                        # buckd's panic(), as rust's panic exits
EXIT_INTERRUPTED = 130                  # Ctrl-C: 128 + SIGINT

STATUS_TIMEOUT = 5.0    # for a buckd to answer Status, or accept a command; else it is not usable
KILL_TIMEOUT = 2.0      # for the Kill call itself
EXIT_TIMEOUT = 5.0      # for buckd to exit once asked (then SIGKILL), and again after SIGKILL
START_TIMEOUT = 30.0    # for `buck daemon` to report that buckd serves
LOCK_TIMEOUT = 60.0     # for another client to finish starting or killing buckd
LOCK_PATIENCE = 1.0     # after this long waiting for lifecycle.lock, say for whom
POLL_INTERVAL = 0.005   # between two looks at a condition we wait for
ATTEMPTS = 4            # restarts and resends before we give up on a fight over buckd
TAIL_LINES = 20         # of a dead buckd's stderr, quoted in the report

HERE = os.path.dirname(os.path.realpath(__file__))
grpc = pb = pb_grpc = None      # imported by load_grpc(), by the commands that talk to buckd
_version = None


class Fail(Exception):
    """A failure to report on stderr as `buck: <message>`, never as a traceback."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


def say(message):
    print(f"{TOOL}: {message}", file=sys.stderr, flush=True)


def read_file(path):
    """The file's bytes, or None if it cannot be read (missing, a directory, ...). Never waits
    on a FIFO."""
    try:
        with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
            return f.read()
    except OSError:
        return None


def poll(condition, timeout, interval=POLL_INTERVAL):
    """Wait until condition() is true; False if it still is not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def version():
    """A checksum of SOURCES: every edit is a new buck build. (zlib imports in 0.1 ms, hashlib 6.)"""
    global _version
    if _version is None:
        import zlib
        crc = 0
        for name in SOURCES:
            data = read_file(os.path.join(HERE, name))
            if data is None:
                raise Fail(f"cannot read {os.path.join(HERE, name)} (listed in SOURCES)")
            crc = zlib.crc32(data, crc)
        _version = f"{crc:08x}"
    return _version


# --- The lifecycle log (README, "Watching the protocol"): with BUCK_LIFECYCLE_LOG=PATH every
# client and buckd appends a JSON line per step of the doc it takes, for lifecycle.py to check
# and draw. With BUCK_LIFECYCLE_STOP_AT=STEP a process stops itself (SIGSTOP) right after that
# step, for a test to act at that very moment.
LOG_PATH, STOP_AT = os.environ.get(LOG_ENV), os.environ.get(STOP_AT_ENV)
LOG_PATH = LOG_PATH and os.path.abspath(LOG_PATH)     # buckd's cwd is "/"
trace = {"role": "client", "dir": None, "fd": None, "locked": False, "run": {}}  # buckd: "daemon"


def step(name, /, **fields):
    """Record that this process has taken step `name` of the doc. `run` tells apart two
    processes that had the same pid (pids are reused, within a long soak too)."""
    if LOG_PATH:
        import json
        run = trace["run"].setdefault(os.getpid(), os.urandom(4).hex())
        line = {"t": time.time(), "pid": os.getpid(), "run": run, "role": trace["role"],
                "version": version(), "dir": trace["dir"], "step": name, **fields}
        try:
            if trace["fd"] is None:
                trace["fd"] = os.open(LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.write(trace["fd"], json.dumps(line).encode() + b"\n")   # one write: lines never mix
        except OSError:
            pass                    # the log is there to watch: it never fails a command
    if name == STOP_AT:
        import signal
        os.kill(os.getpid(), signal.SIGSTOP)


# --- "a directory in $HOME/.buck specific to that repository+output directory"

def daemon_dir(isolation):
    """$HOME/.buck/buckd/<repo root without its leading />/<isolation dir>."""
    home = os.environ.get("HOME")
    if not home:
        raise Fail(f"HOME is not set: {DAEMON} keeps its files in $HOME/{STATE_DIR}")
    cwd = root = os.getcwd()
    while not os.path.isfile(os.path.join(root, MARKER)):
        if root == os.path.dirname(root):
            raise Fail(f"not in a {TOOL} repository: no {MARKER} in {cwd} or its parents")
        root = os.path.dirname(root)
    return os.path.join(os.path.abspath(home), STATE_DIR, DAEMON, root.lstrip("/"), isolation)


def parse_info(raw):
    """buckd.info as a dict, or None if it is not a complete one (missing, corrupt, cut)."""
    import json
    try:
        info = json.loads(raw or b"")
        if all(type(info[k]) is t for k, t in (("pid", int), ("port", int), ("version", str),
                                                ("auth_token", str))):
            return info
    except (ValueError, TypeError, KeyError):
        pass
    return None


def read_info(d):
    return parse_info(read_file(os.path.join(d, INFO_FILE)))


# "only a single daemon is allowed at a time": the one holding the lock on buckd.pid. buckd
# holds it as a POSIX record lock, so that the kernel can tell which process holds it
# (F_GETLK), without anyone taking it. The file's text is for humans: it can lie.

def lock_holder(fd):
    """The pid holding a write lock on fd's file, or None. It asks; it takes nothing."""
    import fcntl
    import struct
    linux = sys.platform.startswith("linux")    # struct flock's layout differs on macOS, BSD
    layout, query = ("hhqqi", (fcntl.F_WRLCK, 0, 0, 0, 0)) if linux else ("qqihh", (0, 0, 0, fcntl.F_WRLCK, 0))
    answer = struct.unpack(layout, fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, *query)))
    kind, pid = (answer[0], answer[4]) if linux else (answer[3], answer[2])
    return None if kind == fcntl.F_UNLCK else pid


def holder(d):
    """The pid of the running buckd as the kernel knows it, or None if none runs. (0 is a
    holder in another pid namespace: alive, but not ours to signal.)"""
    try:
        fd = os.open(os.path.join(d, PID_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return lock_holder(fd)
    finally:
        os.close(fd)


# --- "client connection and buckd startup"

def load_grpc():
    """Import grpc and the stubs beside us. grpc is quiet here; buckd gets the user's setting."""
    global grpc, pb, pb_grpc
    if grpc is None:
        quiet = "GRPC_VERBOSITY" not in os.environ
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        sys.path.insert(0, HERE)
        try:
            import grpc as grpc_module, daemon_pb2, daemon_pb2_grpc
        except ImportError as e:
            raise Fail(f"{e}: run `make setup`, then use .venv/bin/python (see README.md)")
        finally:
            if quiet:               # grpc has read it by now
                del os.environ["GRPC_VERBOSITY"]
        grpc, pb, pb_grpc = grpc_module, daemon_pb2, daemon_pb2_grpc
    return grpc, pb, pb_grpc


class Connection:
    """A channel to the buckd that a buckd.info names. Its token, sent with every call, is also
    that buckd's identity: a buckd started later on the same port refuses it."""

    def __init__(self, info):
        load_grpc()
        self.pid = info["pid"]
        self.channel = grpc.insecure_channel(f"127.0.0.1:{info['port']}",
                                             options=[("grpc.enable_http_proxy", 0)])
        self.stub = pb_grpc.DaemonApiStub(self.channel)
        self.metadata = ((TOKEN_KEY, info["auth_token"]),)

    def status(self):
        return self.stub.Status(pb.StatusRequest(), timeout=STATUS_TIMEOUT, metadata=self.metadata)

    def kill(self, reason):
        """Ask buckd to shut down. False if the call failed (wedged, or gone already)."""
        try:
            self.stub.Kill(pb.KillRequest(reason=reason), timeout=KILL_TIMEOUT, metadata=self.metadata)
        except grpc.RpcError:
            return False
        return True


def rpc_error(e):
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)


def connect(d, isolation):
    """Steps 1-3 of "client connection", and a (re)start when they fail (ATTEMPTS times at most):
    a Connection to a buckd of this client's version, and its Status reply."""
    for _ in range(ATTEMPTS):
        raw = read_file(os.path.join(d, INFO_FILE))     # 1. read buckd.info
        step("connect.1", found=raw is not None)
        conn, reply, problem = check_version(raw)       # 2-3. connect, check the version
        if conn:
            return conn, reply
        restart(d, isolation, raw, problem)
    raise Fail(f"gave up after {ATTEMPTS} attempts: {DAEMON} keeps being replaced "
               "(is a client of another version running?)")


def check_version(raw):
    """Steps 2-3: connect to the buckd that `raw` (buckd.info) names, ask its Status. Returns
    (connection, reply, None), or (None, None, why buckd must be (re)started)."""
    info = parse_info(raw)
    if info is None:
        return None, None, f"{INFO_FILE} is corrupt: starting {DAEMON}" if raw else f"starting {DAEMON}"
    conn = Connection(info)
    try:
        reply = conn.status()
    except grpc.RpcError as e:
        return None, None, f"{DAEMON} (pid {info['pid']}) is not usable ({rpc_error(e)}): restarting"
    step("connect.3", daemon_pid=reply.pid, daemon_version=reply.version, ok=reply.version == version())
    if reply.version != version():
        return None, None, f"{DAEMON} version mismatch (daemon {reply.version}, client {version()}): restarting"
    return conn, reply, None


def restart(d, isolation, seen, problem):
    """"To start/restart the buckd process", steps 1-6; unless, once we hold the lock, buckd.info
    is no longer what we have `seen`: another client has just started a buckd, and we use it."""
    with lifecycle_lock(d):                             # 1. (6. on leaving)
        wait_if_starting(d)
        if read_file(os.path.join(d, INFO_FILE)) != seen:
            return
        info = parse_info(seen)
        if info and holder(d) is None:                  # it died, leaving its files behind
            keep_logs(d)
            say(f"{DAEMON} crashed, see {crash_log(d, info['pid'])}")
            problem = f"starting {DAEMON}"
        say(problem)
        kill_daemon(d, f"{DAEMON} was restarted by pid {os.getpid()} (client version {version()})")
        start_daemon(d, isolation)                      # 4-5.


def wait_if_starting(d):
    """A buckd that locked buckd.pid less than START_TIMEOUT ago and that buckd.info does not
    name yet is starting (maybe for an interrupted client): wait for it, rather than kill it."""
    pid, named = holder(d), lambda: (read_info(d) or {}).get("pid") == pid
    try:
        age = time.time() - os.stat(os.path.join(d, PID_FILE)).st_mtime
    except OSError:
        return
    if pid and age < START_TIMEOUT and not named():
        poll(lambda: holder(d) != pid or named(), START_TIMEOUT - age)


def keep_logs(d):
    """Move buckd.stdout and buckd.stderr into prev/, where they outlive the next start
    (done by buckd as it starts, and by a client that finds buckd dead)."""
    os.makedirs(os.path.join(d, PREV_DIR), 0o700, exist_ok=True)
    for name in (STDOUT_FILE, STDERR_FILE):
        try:
            os.replace(os.path.join(d, name), os.path.join(d, PREV_DIR, name))
        except FileNotFoundError:
            pass


def crash_log(d, pid):
    """Buckd `pid`'s stderr, found by the pid its first line names, and its last lines."""
    logs = [(path, read_file(path) or b"") for path in
            (os.path.join(d, STDERR_FILE), os.path.join(d, PREV_DIR, STDERR_FILE))]
    path, text = next(((p, t) for p, t in logs if f" pid {pid} ".encode() in t[:200]), logs[0])
    lines = text[-8192:].decode(errors="replace").splitlines()[-TAIL_LINES:]
    return path + "".join(f"\n  | {line}" for line in lines)


# "When the client is killing or starting the buckd process, it will grab an exclusive lock
# on the "lifecycle.lock" file in the daemon directory"
class lifecycle_lock:
    """Held while this client kills or starts buckd: a flock, released by the kernel however its
    holder dies. The holder writes its pid and command line in it, for waiting clients to name."""

    def __init__(self, d):
        self.d = d

    def __enter__(self):
        os.makedirs(self.d, 0o700, exist_ok=True)
        self.fd = os.open(os.path.join(self.d, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not poll(self.take, LOCK_PATIENCE):
            whom = one_line(os.pread(self.fd, 200, 0))
            say(f"waiting for another {TOOL} client to finish starting or killing {DAEMON}: {whom}")
            if not poll(self.take, LOCK_TIMEOUT):
                os.close(self.fd)
                raise Fail(f"timed out after {LOCK_TIMEOUT:.0f} s waiting for {LOCK_FILE} "
                           f"(held by: {whom})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"pid %d: %s\n" % (os.getpid(), b" ".join(map(os.fsencode, sys.argv))), 0)
        trace["locked"] = True      # first: a Ctrl-C from here on still logs restart.6
        step("restart.1")

    def take(self):
        import fcntl
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def __exit__(self, *exception):
        step("restart.6")
        trace["locked"] = False
        os.close(self.fd)           # our only fd of it: closing it releases the flock


def one_line(raw):
    """Text from a file, safe to print: one line, control characters escaped."""
    text = raw.decode(errors="replace").strip() or "?"
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def kill_daemon(d, reason):
    """Steps 2-3 of "start/restart": send buckd a kill, then make sure, by pid, that it has exited
    (SIGTERM if the call fails, SIGKILL as the last resort). Returns the pid, or None."""
    import signal
    pid = holder(d)
    step("restart.2", daemon_pid=pid)
    if pid is None:
        return None
    info, how = read_info(d), "rpc"
    if not (info and info["pid"] == pid and Connection(info).kill(reason)):
        how = "sigterm"             # the same request, as a signal: buckd exits cleanly
        signal_buckd(d, pid, signal.SIGTERM)
    gone = lambda: holder(d) != pid
    if not poll(gone, EXIT_TIMEOUT):
        how = "sigkill"
        signal_buckd(d, pid, signal.SIGKILL)
        if not poll(gone, EXIT_TIMEOUT):
            raise Fail(f"could not kill {DAEMON} (pid {pid})")
    step("restart.3", daemon_pid=pid, how=how)
    return pid


def signal_buckd(d, pid, sig):
    """Signal pid only if the kernel says it holds buckd.pid's lock: never a process that a
    stale or forged buckd.pid names, never 0 or 1 (a process group, init), never us."""
    if pid > 1 and pid != os.getpid() and holder(d) == pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass                    # it has just exited


def start_daemon(d, isolation):
    """Steps 4-5 of "start/restart": run `buck daemon`, which exits once buckd serves."""
    import subprocess
    proc = subprocess.Popen([sys.executable, os.path.realpath(__file__), "--isolation-dir",
                             isolation, "daemon"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    load_grpc()                     # our own grpc import overlaps the daemon's start
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        kill_daemon(d, "it did not start in time")
        raise Fail(f"{DAEMON} did not start within {START_TIMEOUT:.0f} s, see {crash_log(d, None)}")
    step("restart.4", exit=proc.returncode)
    if proc.returncode == 0:
        step("restart.5", daemon_pid=holder(d))
    elif proc.returncode > 0 and proc.returncode != EXIT_ALREADY_RUNNING:
        why = (err.decode(errors="replace").strip().splitlines() or ["no reason given"])[-1]
        raise Fail(f"{DAEMON} failed to start: {why.removeprefix(f'{TOOL}: ')}")
    # Else a buckd was started behind our back (exit 3), or `buck daemon` was killed: buckd
    # may be up or not. Either way the connect loop sees to it.


# --- Commands

def cmd_status(d, isolation, operands, options):
    """Report the running buckd, whatever its version; never start one."""
    info, pid = read_info(d), holder(d)
    if info and info["pid"] == pid:
        conn = Connection(info)
        try:
            return print_status(conn.status(), "json" in options)
        except grpc.RpcError as e:
            if not (e.code() == grpc.StatusCode.UNAVAILABLE and poll(lambda: holder(d) != pid, EXIT_TIMEOUT)):
                raise Fail(f"{DAEMON} (pid {pid}) is not responding: {rpc_error(e)}")
            pid = None                  # it was shutting down, and now it is gone
    if pid is not None:
        raise Fail(f"{DAEMON} (pid {pid}) runs, but {INFO_FILE} does not name it (starting?)")
    print(f"no {DAEMON} running")   # (a buckd.info left behind names a dead buckd)
    return 0


def cmd_server(d, isolation, operands, options):
    """Make sure a buckd of this client's version runs, then report it."""
    return print_status(connect(d, isolation)[1], "json" in options)


def print_status(reply, as_json):
    import json
    fields = {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}
    print(json.dumps(fields) if as_json else f"{DAEMON} is running" + "".join(f"\n  {k}: {v}" for k, v in fields.items()))
    return 0


def cmd_kill(d, isolation, operands, options):
    """`buck kill`: steps 1-3 and 6 of "start/restart"."""
    with lifecycle_lock(d):
        pid = kill_daemon(d, f"`{TOOL} kill` was invoked by pid {os.getpid()}")
    print(f"{DAEMON} killed (pid {pid})" if pid is not None else f"no {DAEMON} running")
    return 0


def run_command(d, isolation, name, operands, options):
    """A command that runs in buckd, sent on the very connection whose version was checked, its
    output streamed as it comes. Until buckd accepts it we may resend it; after, never."""
    import queue
    import threading
    load_grpc()
    refusals = {grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE, grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_FAILED}
    request = pb.CommandRequest(name=name, args=[os.fsencode(a) for a in operands],
                                options=options, cwd=os.fsencode(os.getcwd()))
    for _ in range(ATTEMPTS):
        conn, _ = connect(d, isolation)
        accepted, events = threading.Event(), queue.Queue()
        stream = conn.stub.Command(handshake(request, accepted), metadata=conn.metadata)
        threading.Thread(target=read_stream, args=(stream, events), daemon=True).start()
        try:
            event = events.get(timeout=STATUS_TIMEOUT)  # as for Status: else buckd is not usable
        except queue.Empty:
            event = None
        if isinstance(event, pb.CommandEvent) and event.HasField("accepted"):
            accepted.set()          # the go-ahead: from here on, never resend
            break
        stream.cancel()             # buckd went away before it accepted: it ran nothing
        if isinstance(event, grpc.Call) and event.code() in refusals:
            raise Fail(f"{DAEMON} refused the command: {event.details()}", refusals[event.code()])
    else:
        raise Fail(f"{DAEMON} did not accept the command")
    step("command", daemon_pid=conn.pid, name=name)
    while isinstance(event := events.get(), pb.CommandEvent):
        kind = event.WhichOneof("event")
        if kind in ("stdout", "stderr"):
            out = sys.stdout if kind == "stdout" else sys.stderr
            out.buffer.write(getattr(event, kind))
            out.flush()
        elif kind == "exit_code":
            return event.exit_code
        elif kind == "shutdown":
            raise Fail(f"{DAEMON} shut down during the command: {event.shutdown}")
    if event is None:
        raise Fail(f"{DAEMON} ended the command without an exit code")
    raise Fail(f"lost {DAEMON} (pid {conn.pid}) during the command ({rpc_error(event)}); "
               f"it crashed or was killed, see {crash_log(d, conn.pid)}")


def read_stream(stream, events):
    """Put a stream's events in a queue, then None; or the error that ended it. (The main
    thread waits on the queue, with a timeout where it needs one: a grpc call whose connection
    went away at the wrong moment can wait forever, even once cancelled.)"""
    try:
        for event in stream:
            events.put(event)
        events.put(None)
    except grpc.RpcError as e:
        events.put(e)


def handshake(request, accepted):
    """Our side of a Command stream (daemon.proto): the command, then, once buckd has
    accepted it, the empty go-ahead that lets buckd run it."""
    yield request
    accepted.wait()
    yield pb.CommandRequest()


# --- The command line

def parse(argv):
    """argv -> (isolation dir, command, operands, options) as COMMANDS says; options are
    {name: value}, "" for a flag."""
    isolation, argv = DEFAULT_ISOLATION, list(argv)
    while argv and argv[0].split("=")[0] == "--isolation-dir":
        word = argv.pop(0)
        isolation = word.partition("=")[2] if "=" in word else (argv.pop(0) if argv else "")
        if not isolation or "/" in isolation or isolation in (".", ".."):
            raise Fail(f"bad --isolation-dir {isolation!r}: a name, not a path (usage: {USAGE_LINE})", EXIT_USAGE)
    name = " ".join(argv[:2]) if " ".join(argv[:2]) in COMMANDS else " ".join(argv[:1])
    if name not in COMMANDS:
        raise Fail(f"{f'unknown command {name!r}' if name else 'no command'} "
                   f"(usage: {USAGE_LINE}; see `{TOOL} help`)", EXIT_USAGE)
    spec = COMMANDS[name][0].split()
    usage = f"(usage: {' '.join([TOOL, name, *spec])})"
    takes = {w.strip("[]").split("=")[0]: "=" in w for w in spec if w.startswith("[--")}
    slots = [w for w in spec if not w.startswith("[--")]
    words, operands, options = iter(argv[len(name.split()):]), [], {}
    for word in words:
        key, has_value, value = word.partition("=")
        if word == "--":
            operands += words
        elif not word.startswith("--"):
            operands.append(word)
        elif key not in takes or has_value and not takes[key]:
            raise Fail(f"{name}: unknown option {word!r} {usage}", EXIT_USAGE)
        elif takes[key] and not has_value and (value := next(words, None)) is None:
            raise Fail(f"{name}: {key} needs a value {usage}", EXIT_USAGE)
        else:
            options[key[2:]] = value
    least = sum(not w.startswith("[") for w in slots)
    most = float("inf") if any(w.rstrip("]").endswith("...") for w in slots) else len(slots)
    if not least <= len(operands) <= most:
        raise Fail(f"{name}: {'missing' if len(operands) < least else 'extra'} operand(s) {usage}", EXIT_USAGE)
    return isolation, name, operands, options


def usage():
    commands = "".join(f"  {f'{name} {args}':<17}{text}\n" for name, (args, text) in COMMANDS.items() if text)
    return (f"usage: {USAGE_LINE}\n\ncommands:\n{commands}\noptions:\n  --isolation-dir NAME  "
            f"use a separate {DAEMON} (default {DEFAULT_ISOLATION}), with its own daemon dir\n")


def main(argv):
    """`buck ARGV`: returns the exit code. Every failure is one line on stderr."""
    try:
        if not argv or argv[0] in ("help", "-h", "--help"):
            print(usage(), end="", file=sys.stdout if argv else sys.stderr)
            return 0 if argv else EXIT_USAGE
        isolation, name, operands, options = parse(argv)
        if name == "version":
            print(f"{TOOL} {version()}")
            return 0
        d = trace["dir"] = daemon_dir(isolation)
        if name == "daemon":
            import buckd
            return buckd.main(d, "foreground" in options)
        import signal
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `buck hash | head` ends quietly
        signal.signal(signal.SIGINT, interrupted)
        if name in LOCAL_COMMANDS:
            return LOCAL_COMMANDS[name](d, isolation, operands, options)
        return run_command(d, isolation, name, operands, options)
    except Fail as e:
        say(e)
        return e.code
    except OSError as e:
        say(f"{e.filename}: {e.strerror}" if e.filename else e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def interrupted(*_):
    """Ctrl-C, once grpc may be loaded: exit at once (a KeyboardInterrupt could land in a grpc
    finalizer, which swallows it). Our connection's end stops our command in buckd."""
    if trace["locked"]:
        try:
            step("restart.6")
        except Exception:           # we interrupted step("restart.1") itself (its first
            pass                    # `import json`): restart.1 was not written either
    os._exit(EXIT_INTERRUPTED)


LOCAL_COMMANDS = {"status": cmd_status, "server": cmd_server, "kill": cmd_kill}

if __name__ == "__main__":
    sys.modules.setdefault("buck", sys.modules["__main__"])    # buckd imports us as `buck`
    try:
        code = main(sys.argv[1:])
        sys.stdout.flush()
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = EXIT_FAILED          # our reader went away (`buck help | head -1`)
    os._exit(code)                  # skip interpreter teardown: grpc's threads make it slow
