# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""buckd: the daemon lifecycle of buck2's daemon_lifecycle.md (link: buck.py), both sides, in
the doc's order: the daemon dir's files; "daemon process flow" (main, run, serve); the client's
side, "client connection and buckd startup" (connect, restart); "buck kill"."""
import errno, fcntl, json, os, select, signal, stat, struct, sys, threading, time
from collections import namedtuple
from contextlib import suppress

import buck
import buck_commands
from buck import (ATTEMPTS, DAEMON, END_FILE, EXIT_ALREADY_RUNNING, EXIT_FAILED, EXIT_INTERRUPTED,
                  EXIT_TIMEOUT, HERE, INFO_FILE, KILL_TIMEOUT, LOCK_FILE, LOCK_PATIENCE,
                  LOCK_TIMEOUT, PID_FILE, PREV_DIR, RECHECK_TIMEOUT, SETTINGS, STARTED_ENV,
                  START_TIMEOUT, STATUS_TIMEOUT, STDERR_FILE, STDOUT_FILE, STUBS, TOKEN_KEY, TOOL,
                  Fail, checksum, daemon_dir, daemon_settings, open_file, out, owned, poll,
                  printable, read_file, say, step, to_stderr, version, write_json)

GRACE = 2.0             # seconds running commands get, at shutdown, to say why they end
MAX_COMMANDS = 256      # commands running at once; one more is refused: buckd is busy
SPARE_THREADS = 16      # server threads beyond those: Status and Kill never queue
MARKER_GRACE = 1.0      # seconds a repository's marker may be missing: an editor rewriting it
NOFOLLOW = os.O_NOFOLLOW    # every file of a daemon dir: a planted symlink is refused, not followed
grpc = pb = pb_grpc = None  # imported by load_grpc: in buckd after daemonizing (no fork after)


# --- The daemon dir's files: buckd.pid, buckd.info, buckd.end, the logs and prev/

def holder(d, pid_file=PID_FILE):
    """The running buckd: who holds d's buckd.pid (or pid_file) lock, says the kernel; or None."""
    linux = sys.platform.startswith("linux")    # struct flock's form differs on macOS, BSD
    form = "hhqqi" if linux else "qqihh"
    query = (fcntl.F_WRLCK, 0, 0, 0, 0) if linux else (0, 0, 0, fcntl.F_WRLCK, 0)
    try:
        fd = open_file(os.path.join(d, pid_file), os.O_RDONLY | NOFOLLOW)
        try:
            answer = struct.unpack(form, fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(form, *query)))
        finally:
            os.close(fd)
    except OSError as e:            # no file, a link, none one can lock (a FIFO): no buckd holds it
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise                   # (out of fds: we cannot tell)
        return None
    kind, pid = (answer[0], answer[4]) if linux else (answer[3], answer[2])
    return None if kind == fcntl.F_UNLCK else pid


def named_pid(text):
    """The pid that buckd.pid's text names (the last buckd to lock it), or None."""
    word = (text or b"").split(b"\n")[0]
    return int(word) if word.isdigit() and len(word) < 10 else None


def last_pid(d):
    return named_pid(read_file(os.path.join(d, PID_FILE), NOFOLLOW))


def read_info(d):
    return parse_info(read_file(os.path.join(d, INFO_FILE), NOFOLLOW))


def parse_info(raw):
    """buckd.info as a dict, or None if it is not a complete, valid one, whatever is wrong."""
    fields = (("pid", int), ("port", int), ("version", str), ("auth_token", str))
    with suppress(ValueError, RecursionError, AttributeError):
        info = json.loads(raw or b"")
        if all(type(info.get(key)) is kind for key, kind in fields) and 0 < info["port"] < 65536 \
                and info["auth_token"].isascii() and info["auth_token"].isalnum():
            return info
    return None


def instance(pid, start_time):
    """The mark buckd gives the processes it runs (INSTANCE_ENV): its pid, and when it started."""
    return f"{pid}@{start_time!r}"


def runs_this_command(d):
    """Is this command run by d's buckd (buckd.pid's holder)? By pid, and start time if known."""
    pid, mark, info = holder(d), os.environ.get(buck.INSTANCE_ENV, ""), read_info(d)
    if pid is None or mark.partition("@")[0] != str(pid):
        return False
    return not info or info["pid"] != pid or mark == instance(pid, info.get("start_time"))


def end_record(where):
    """END_FILE in dir `where`: {"pid"} while that buckd runs, then with "how" and "why"; or {}."""
    try:
        end = json.loads(read_file(os.path.join(where, END_FILE), NOFOLLOW) or b"")
    except (ValueError, RecursionError):
        return {}
    kinds = {"pid": int, "how": str, "why": str}
    if type(end) is not dict or set(end) not in ({"pid"}, set(kinds)):
        return {}
    return end if all(type(end[key]) is kinds[key] for key in end) else {}


def how_it_ended(d, last):
    """How buckd `last` (if known) ended, from END_FILE in d or prev/; None if none is known."""
    records = map(end_record, (d, os.path.join(d, PREV_DIR)))
    end = next((end for end in records if end and last in (None, end["pid"])), {})
    if "how" in end:
        return f"pid {end['pid']} ended by {printable(end['how'])}: {printable(end['why'])}"
    if end or last:
        return f"pid {last or end['pid']} vanished without a word (SIGKILL, or out of memory?)"
    return None


def keep_logs(d):
    """Move buckd.stdout, .stderr, .end into prev/ to outlive the next start; what cannot, stays."""
    for name in (STDOUT_FILE, STDERR_FILE, END_FILE):
        with suppress(OSError):     # keeping old logs is never a condition for starting
            os.makedirs(os.path.join(d, PREV_DIR), exist_ok=True)
            os.replace(os.path.join(d, name), os.path.join(d, PREV_DIR, name))


def crash_log(d, pid):
    """Buckd `pid`'s stderr (found by the pid its first line names) and its last 20 lines."""
    paths = (os.path.join(d, STDERR_FILE), os.path.join(d, PREV_DIR, STDERR_FILE))
    mark = f" pid {pid} ".encode()
    path = next((p for p in paths if mark in (read_file(p, NOFOLLOW, 200) or b"")), paths[0])
    tail = read_file(path, NOFOLLOW, 8192, tail=True) or b""        # never the whole log
    lines = tail.decode(errors="replace").splitlines()[-20:]
    return printable(path) + "".join(f"\n  | {line}" for line in lines)


# "There are 3 ways that the buckd process will shutdown"; the records say which one it was.
def record_end(api, how, why):
    """Log how we end; say it in END_FILE while that names us and no killer has said why."""
    daemon_step(api, "daemon.shutdown", reason=why, path=how)
    ours = {"pid": os.getpid()}
    with suppress(OSError):
        if end_record(api.dir) == ours:
            write_json(os.path.join(api.dir, END_FILE), {**ours, "how": how, "why": why})


# --- "daemon process flow": "started with the (hidden) `buck daemon` command".
def main(d, root):
    """`buck daemon`: start buckd; 0 once it serves, 3 if one runs, 2 bad setting, else 1."""
    settings = daemon_settings()
    why = os.environ.pop(STARTED_ENV, f"started by hand (`{TOOL} daemon`, by pid {os.getppid()})")
    for name in SETTINGS:      # what we run inherits none: a setting is live (Configure)
        os.environ.pop(name, None)
    os.makedirs(d, exist_ok=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a Ctrl-C meant for our client must not
    read_end, write_end = os.pipe()                 # stop the buckd it starts
    if os.fork():                   # `buck daemon`: wait for buckd's word, "CODE message"
        os.close(write_end)
        os.wait()                   # for our only child, the intermediate: it exits at once
        with os.fdopen(read_end, "rb") as pipe:
            word = pipe.read().decode(errors="replace")
        died = f"1 {DAEMON} exited during startup, see {os.path.join(d, STDERR_FILE)}"
        code, _, message = (word or died).partition(" ")
        to_stderr(f"{message}\n".encode() if message else b"")
        return int(code)
    os.close(read_end)
    daemonize(f"{DAEMON}[{os.path.basename(root)}]")
    api = DaemonApi(d, root, why, **settings)
    try:
        os._exit(run(api, ready=write_end))
    except BaseException as e:
        panic(api, e)


def daemonize(name):
    """The classic recipe (Stevens, APUE 13.3; PEP 3143), each step for a reason."""
    os.setsid()                     # a session of our own: no terminal, no client's signals
    if os.fork():
        os._exit(0)                 # not a session leader: can never acquire a terminal
    os.chdir("/")                   # keep no directory busy
    os.umask(0o077)                 # every file we create is private
    with suppress(OSError, AttributeError):     # our name in `ps` and `top` (15 bytes, whole
        import ctypes               # characters; Linux: PR_SET_NAME; elsewhere we stay python)
        shown = "".join(c if c.isprintable() else "?" for c in name)     # (as ps shows them)
        short = shown.encode(errors="replace")[:15].decode(errors="ignore").encode()
        ctypes.CDLL(None).prctl(15, short, 0, 0, 0)


def run(api, ready):
    try:
        lock_pid_file(api)                      # "write its pid to a locked file buckd.pid"
        daemon_step(api, "daemon.locked")
        record_start(api)
        redirect_stdio(api)                     # "It redirects its stdout and stderr to files"
        server = start_server(api)              # "starts up the grpc DaemonApi server"
        write_info(api)                         # "write the port ... to the buckd.info file"
    except (OSError, Fail) as e:                # (Fail: no grpc, say)
        return startup_failed(api, ready, e)
    daemon_step(api, "daemon.serving", port=api.port)
    log(f"serving on 127.0.0.1:{api.port}")
    report_ready(ready, 0, "")                  # "Once that is done, the server is ready"
    how, reason = serve(api)
    api.shutdown(reason)
    log(f"shutting down ({how}): {reason}")
    record_end(api, how, reason)
    server.stop(GRACE).wait()                   # running commands get to say why they end
    remove_info(api)
    daemon_step(api, "daemon.exit")
    return 0


def daemon_step(api, name, **fields):
    step(name, api.dir, role="daemon", refuse=api.pid_stat, **fields)


def startup_failed(api, ready, e):
    """Tell `buck daemon` why buckd cannot start (3: another holds buckd.pid: "only a single")."""
    problem = f"{printable(e.filename)}: {e.strerror}" if getattr(e, "filename", None) else str(e)
    if api.pid_stat is None and (pid := holder(api.dir)) is not None:
        running = f"{DAEMON} is already running for {printable(api.dir)} (pid {pid})"
        return report_ready(ready, EXIT_ALREADY_RUNNING, running)
    if api.pid_stat is None:
        return report_ready(ready, EXIT_FAILED, f"{DAEMON} cannot lock: {problem}")
    record_end(api, "startup failure", problem)     # we hold buckd.pid: the records say we end
    remove_info(api)
    daemon_step(api, "daemon.exit")
    return report_ready(ready, EXIT_FAILED, f"{DAEMON} cannot start: {problem}")


def report_ready(ready, code, message):
    """Give `buck daemon` its exit code and message; if it is gone, carry on."""
    with suppress(OSError):
        os.write(ready, f"{code} {message}".encode(errors="backslashreplace"))
    os.close(ready)
    return code


# Correctness 1, "Only a single buckd is running at a time": buckd.pid is "locked exclusively
# by the daemon process until it exits". A POSIX record lock, so that clients can ask the
# kernel who holds it (holder); it drops when we close *any* fd of the file: so open_file
# refuses that file in buckd (api.pid_stat), whatever its name.
def lock_pid_file(api):
    path = os.path.join(api.dir, PID_FILE)
    fd = open_file(path, os.O_RDWR | os.O_CREAT | NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", path)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)                # we hold no lock on it: closing it drops nothing
        raise
    api.pid_fd, api.pid_stat = fd, os.fstat(fd)
    api.last_pid = named_pid(os.pread(fd, 64, 0))      # the buckd before us
    os.ftruncate(fd, 0)             # only once locked
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def record_start(api):
    """Learn how the last buckd ended, keep its logs, and record in END_FILE that we run."""
    api.previous = how_it_ended(api.dir, api.last_pid) or "none known"
    keep_logs(api.dir)
    with suppress(OSError):         # no record of us: the next client says we vanished
        write_json(os.path.join(api.dir, END_FILE), {"pid": os.getpid()})


def redirect_stdio(api):
    """"It redirects its stdout and stderr to files", then logs who we are and why we run."""
    new = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW
    files = [(os.devnull, os.O_RDONLY), (os.path.join(api.dir, STDOUT_FILE), new),
             (os.path.join(api.dir, STDERR_FILE), new)]
    for fd, (path, flags) in enumerate(files):
        opened = open_file(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # (or None)
    log(f"{DAEMON} pid {os.getpid()} version {api.version} starting in {api.dir}")
    log(f"started because: {api.why}; the previous {DAEMON}: {api.previous}")


def write_info(api):
    info = {"pid": os.getpid(), "port": api.port, "version": api.version,
            "auth_token": api.token, "start_time": api.start_time}
    write_json(os.path.join(api.dir, INFO_FILE), info)
    api.info_id = file_id(os.path.join(api.dir, INFO_FILE))


def remove_info(api):
    """Remove buckd.info if it is still the one we wrote (else a newer buckd's)."""
    with suppress(OSError):
        if api.info_id and file_id(os.path.join(api.dir, INFO_FILE)) == api.info_id:
            os.unlink(os.path.join(api.dir, INFO_FILE))


def file_id(path):
    """What tells a file, and a rewrite of it, apart without opening it."""
    st = os.stat(path, follow_symlinks=False)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def log(message):
    with suppress(OSError):         # (a full disk: the log is never a condition for running)
        print(time.strftime("%Y-%m-%d %H:%M:%S"), message, file=sys.stderr, flush=True)


class Wake:
    """The pipe that wakes serve(): signals write their number (set_wakeup_fd), poke() a 0."""

    def __init__(self):
        self.read_end, self.write_end = os.pipe()
        for fd in (self.read_end, self.write_end):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.write_end)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)     # it may run under any lock: it does nothing

    def poke(self):
        with suppress(BlockingIOError):     # the pipe is full: serve() wakes anyway
            os.write(self.write_end, b"\0")

    def wait(self, timeout):
        """Wait up to `timeout` s; the signals received meanwhile, if any."""
        if select.select([self.read_end], [], [], max(0, timeout))[0]:
            return [signal.Signals(byte) for byte in os.read(self.read_end, 512) if byte]
        return []


# "There are 3 ways that the buckd process will shutdown"; and a signal, idleness, a lost repo.
def serve(api):
    """Wait until buckd must shut down; return (how, why). (A panic exits from anywhere.)"""
    checked, missing_since = time.monotonic(), None
    while True:
        now = time.monotonic()
        idle_at = (now if api.commands else api.idle_since) + (api.idle_timeout or float("inf"))
        signals = api.wake.wait(min(checked + api.check_interval, idle_at) - now)
        if api.reason:
            return "kill", api.reason                                           # 1. kill()
        if signals:
            return "signal", f"{DAEMON} received {signals[0].name}"
        now = time.monotonic()
        if now >= checked + api.check_interval:
            if reason := check_files_still_ours(api):
                return "self-check", reason                                     # 2.
            if os.path.isfile(os.path.join(api.root, buck.MARKER)):
                missing_since = None
            elif missing_since is None:             # gone means gone at two checks in a row,
                missing_since = now                 # MARKER_GRACE apart: not being rewritten
            elif now - missing_since >= MARKER_GRACE:
                return "repository gone", f"{printable(api.root)} or its {buck.MARKER} is gone"
            checked = now
        if reason := api.idle_out():
            return "idle", reason


# Shutdown path 2: "buckd will periodically (every 100s or so) check the "buckd.pid" and
# "buckd.info" files to ensure that they still match that buckd process."
def check_files_still_ours(api):
    """Why buckd must exit, or None while buckd.pid and buckd.info name it (opening neither)."""
    try:
        pid_file = os.stat(os.path.join(api.dir, PID_FILE), follow_symlinks=False)
    except OSError:
        return f"{PID_FILE} was removed"
    if not os.path.samestat(pid_file, api.pid_stat):
        return f"{PID_FILE} was replaced"
    if os.pread(api.pid_fd, 64, 0) != f"{os.getpid()}\n".encode():
        return f"{PID_FILE} names another process"
    with suppress(OSError):
        if file_id(os.path.join(api.dir, INFO_FILE)) == api.info_id:
            return None
    return f"{INFO_FILE} was removed or rewritten"


# Shutdown path 3: "If buckd hits a rust `panic()` the buckd process will exit"
def panic(api, error):
    """A bug of buckd's own, wherever it happens: log its traceback, exit at once."""
    import traceback
    with suppress(OSError):         # (a full disk)
        traceback.print_exception(error)
    record_end(api, "panic", repr(error))
    daemon_step(api, "daemon.exit", code=buck.EXIT_PANIC)
    with suppress(OSError):
        sys.stderr.flush()
    os._exit(buck.EXIT_PANIC)


def panics(method):
    """A servicer method whose exception is a panic (grpc would answer UNKNOWN and serve on)."""
    def guarded(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            if context.code() is not None:
                raise               # context.abort(): a refusal, not a bug
            panic(self, e)
    return guarded


def start_server(api):
    """The DaemonApi on 127.0.0.1: a thread per command (MAX_COMMANDS), and spares."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    load_grpc()
    os.environ[buck.INSTANCE_ENV] = instance(os.getpid(), api.start_time)     # before any thread
    server = grpc.server(ThreadPoolExecutor(MAX_COMMANDS + SPARE_THREADS),
                         interceptors=[require_token(api.token)],
                         options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_DaemonApiServicer_to_server(api, server)
    try:
        api.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        socket.create_connection(("127.0.0.1", api.port), timeout=STATUS_TIMEOUT).close()
    except (RuntimeError, OSError) as e:        # (no loopback: nothing could ever connect)
        raise OSError(f"cannot serve on 127.0.0.1 ({e}): is the loopback interface down?")
    return server


def require_token(token):
    """An interceptor refusing every call that lacks this buckd's token (constant-time)."""
    import hmac
    deny = grpc.unary_unary_rpc_method_handler(
        lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad auth token"))

    class RequireToken(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            given = dict(details.invocation_metadata).get(TOKEN_KEY, "").encode()
            return continuation(details) if hmac.compare_digest(given, token.encode()) else deny
    return RequireToken()


class DaemonApi:
    """All buckd knows, and the DaemonApi it serves."""

    def __init__(self, d, root, why, check_interval_s, idle_timeout_s):
        self.dir, self.root, self.why, self.version = d, root, printable(why), version()
        self.check_interval, self.idle_timeout = check_interval_s, idle_timeout_s
        self.pid_fd = self.pid_stat = self.last_pid = self.info_id = None   # set by lock_pid_file
        self.previous, self.port, self.token = "none known", 0, os.urandom(16).hex()
        self.start_time, self.idle_since = time.time(), time.monotonic()
        self.wake = Wake()
        self.lock = threading.Lock()    # for commands, idle_since, reason; never in a handler
        self.commands = {}          # the running ones: their stop Event -> [request, started]
        self.reason = None          # why buckd is shutting down

    @panics
    def Status(self, request, context):
        """Step 3's answer, and what runs. Not a use: idleness counts from the last command."""
        if self.reason:             # (a client must not use us: it restarts buckd, once we exit)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{DAEMON} is shutting down: {self.reason}")
        now = time.monotonic()
        with self.lock:
            running = [buck_commands.running(request, now - started)
                       for request, started in self.commands.values() if request]
            idle = 0 if self.commands else now - self.idle_since
        settings = pb.Settings(check_interval_s=self.check_interval,
                               idle_timeout_s=self.idle_timeout)
        return pb.StatusResponse(
            pid=os.getpid(), port=self.port, version=self.version, daemon_dir=printable(self.dir),
            start_time=self.start_time, uptime_s=time.time() - self.start_time,
            active_commands=len(self.commands), idle_s=idle, started_because=self.why,
            previous_end=self.previous, figures=buck.workload.status(), settings=settings,
            commands=running, **buck_commands.resource_usage())

    @panics
    def Configure(self, request, context):
        """A client's daemon settings, applied live: serve() reads them when it wakes."""
        try:
            for name, (field, *_) in SETTINGS.items():
                buck.setting(name, str(getattr(request, field)))
        except Fail as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        with self.lock:             # a new idle timeout counts from now: our client's buckd stays
            self.check_interval = request.check_interval_s
            self.idle_timeout = request.idle_timeout_s
            self.idle_since = max(self.idle_since, time.monotonic())
        self.wake.poke()
        return request

    def idle_out(self):
        """If no command ran for idle_timeout, begin the exit, under the lock: a command that starts
        meanwhile is counted first, or refused before it is accepted (its client resends it)."""
        with self.lock:
            idle = not self.commands and time.monotonic() - self.idle_since >= self.idle_timeout
            if self.idle_timeout and idle and not self.reason:
                self.reason = f"no command for {self.idle_timeout:g} s ({buck.IDLE_TIMEOUT_ENV})"
                return self.reason
        return None

    # Shutdown path 1: "The grpc api includes a `kill()` call that will shutdown buckd."
    @panics
    def Kill(self, request, context):
        self.shutdown(request.reason or "killed by a client")
        return pb.KillResponse()

    def shutdown(self, reason):
        """Begin the exit once: stop every running command, and wake serve()."""
        with self.lock:
            if self.reason is None:
                self.reason = reason
                for stop in self.commands:
                    stop.set()
        self.wake.poke()

    def Command(self, requests, context):
        """A command (buck_commands.serve_command), counted while it runs, unless buckd is ending
        or busy."""
        stop, running = threading.Event(), [None, time.monotonic()]     # (request, started)
        with self.lock:             # counted from the start: a stream holds a thread
            if self.reason is not None:     # not accepted: the client may send it elsewhere
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{DAEMON} is shutting down")
            if len(self.commands) >= MAX_COMMANDS:
                busy = f"{DAEMON} is busy: {MAX_COMMANDS} run"
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
            self.commands[stop] = running
        if not context.add_callback(stop.set):      # the call ends: the client went away
            stop.set()
        try:
            yield from buck_commands.serve_command(requests, context, running, stop, self)
        except grpc.RpcError:
            return                  # the client went away during the handshake
        except Exception as e:
            panic(self, e)
        finally:
            with self.lock:         # the handler has returned: no longer running; idle from now
                del self.commands[stop]
                self.idle_since = time.monotonic()


# --- The client's side: "client connection and buckd startup", then "buck kill"
def client(isolation, name, args, options):
    """Every command but help, version and daemon: ours, or one that buckd runs."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `buck hash | head` ends quietly
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:   # (ignored: a background job)
        signal.signal(signal.SIGINT, interrupted)
    if local := buck_commands.local_command(name):
        return local(isolation, options)
    return run_command(owned(daemon_dir(isolation)), isolation, name, args, options)


def interrupted(*_):
    """Ctrl-C once grpc may be loaded: exit now (grpc finalizers swallow KeyboardInterrupt)."""
    for d in list(held_locks):
        step("restart.6", d)
    os._exit(EXIT_INTERRUPTED)


held_locks = set()                  # the daemon dirs whose lifecycle.lock we hold


def load_grpc():
    """Import grpc and the stubs beside us. grpc is quiet here; buckd gets the user's setting."""
    global grpc, pb, pb_grpc
    if grpc is None:
        quiet = "GRPC_VERBOSITY" not in os.environ
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        sys.path.insert(0, HERE)
        try:
            import grpc, daemon_pb2 as pb, daemon_pb2_grpc as pb_grpc    # (into our globals)
        except ImportError as e:
            raise Fail(f"{e}: {TOOL} needs grpcio and protobuf in {printable(HERE)} ({STUBS})")
        finally:
            if quiet:               # grpc has read it by now
                del os.environ["GRPC_VERBOSITY"]


class Connection:
    """A channel to the buckd a buckd.info names; its token is also that buckd's identity."""

    def __init__(self, info):
        load_grpc()
        no_proxy = [("grpc.enable_http_proxy", 0)]
        channel = grpc.insecure_channel(f"127.0.0.1:{info['port']}", options=no_proxy)
        self.stub = pb_grpc.DaemonApiStub(channel)
        self.metadata = ((TOKEN_KEY, info["auth_token"]),)

    def status(self, timeout=STATUS_TIMEOUT):
        return self.stub.Status.future(pb.StatusRequest(), timeout=timeout, metadata=self.metadata)

    def kill(self, reason):
        """The Kill call, under way: its .exception() is None once buckd took it."""
        request = pb.KillRequest(reason=reason)
        return self.stub.Kill.future(request, timeout=KILL_TIMEOUT, metadata=self.metadata)


def rpc_error(e):
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)


# Why a client (re)starts buckd: an outcome of steps 1-3, named as buck2's connect.rs does.
Why = namedtuple("Why", "outcome text")

NO_DAEMON, CORRUPT, NOT_USABLE, MISMATCH, CRASHED = (
    "no daemon", "corrupt info", "not usable", "version mismatch", "crashed")


def connect(d, isolation):
    """Steps 1-3 of "client connection", and a (re)start when they fail: yields a checked
    (Connection, Status reply) each time the caller needs one, ATTEMPTS in all for the whole
    command (the one bound on restarts and resends), then gives up."""
    try:
        daemon_settings()
    except Fail as e:
        raise Fail(f"bad {DAEMON} setting: {e}") from None
    for _ in range(ATTEMPTS):
        raw = read_file(os.path.join(d, INFO_FILE), NOFOLLOW)          # 1. read buckd.info
        step("connect.1", d, found=raw is not None)
        checked = check_version(d, raw)                               # 2-3. connect, check
        if isinstance(checked, Why):
            restart(d, isolation, raw, checked)
        else:
            apply_settings(d, *checked)
            yield checked
    raise Fail(f"gave up after {ATTEMPTS} attempts to reach a {DAEMON} of this version that takes "
               "the command: it keeps being replaced (is a client of another version running?)")


# Correctness 3, "A client only uses a buckd connection after making sure it has a compatible
# version": a Connection is only ever returned here, after a Status naming our version.
def check_version(d, raw, timeout=STATUS_TIMEOUT):
    """Steps 2-3: (Connection, Status reply), or Why not."""
    info = parse_info(raw)
    pid = holder(d) if info is None else None       # (the usual path asks no lock)
    if info is None and (raw or pid):
        held = f"missing, while pid {pid} holds {PID_FILE}"
        what = "corrupt" if raw else f"{held} (starting, or exiting)"
        return Why(CORRUPT, f"{INFO_FILE} is {what}")
    if info is None:
        return Why(NO_DAEMON, f"no {DAEMON} was running")
    conn = Connection(info)
    try:
        reply = conn.status(timeout).result()
    except grpc.RpcError as e:
        return Why(NOT_USABLE, f"{DAEMON} (pid {info['pid']}) is not usable ({rpc_error(e)})")
    ok = reply.version == version()
    step("connect.3", d, daemon_pid=reply.pid, daemon_version=reply.version, ok=ok)
    if not ok:
        versions = f"(daemon {reply.version}, client {version()})"
        return Why(MISMATCH, f"{DAEMON} version mismatch {versions}")
    return conn, reply


def apply_settings(d, conn, reply):
    """A setting this client gives (BUCKD_...) that differs from buckd's is applied to it live
    and said in one line; never to the buckd that runs this command."""
    given, wanted, changes = daemon_settings(given_only=True), pb.Settings(), []
    wanted.CopyFrom(reply.settings)
    for name, (field, *_) in SETTINGS.items():
        if field in given and given[field] != getattr(wanted, field):
            changes.append(f"{name} {getattr(wanted, field):g} -> {given[field]:g} s")
            setattr(wanted, field, given[field])
    if not changes:
        return
    changed, inside = ", ".join(changes), runs_this_command(d)
    step("settings", d, daemon_pid=reply.pid, changes=changes, applied=not inside)
    if inside:
        return say(f"this command runs inside {DAEMON} (pid {reply.pid}): not changing {changed}")
    try:
        conn.stub.Configure(wanted, timeout=STATUS_TIMEOUT, metadata=conn.metadata)
    except grpc.RpcError as e:
        problem = f"could not apply {changed} ({rpc_error(e)})"
        raise Fail(f"{DAEMON} (pid {reply.pid}): {problem}") from None
    reply.settings.CopyFrom(wanted)
    say(f"{DAEMON} (pid {reply.pid}): {changed}, applied")


# "To start/restart the buckd process, the client does:"
def restart(d, isolation, raw, why):
    """Steps 1-6, unless once we hold the lock buckd no longer needs them. `raw`: the bytes of
    buckd.info that steps 1-3 failed on."""
    with LifecycleLock(d):                  # 1. lock "lifecycle.lock"; 6. release it on leaving
        refuse_to_restart_here(d, why)
        wait_while_a_buckd_starts(d)
        if read_file(os.path.join(d, INFO_FILE), NOFOLLOW) != raw:
            return                          # another client restarted it meanwhile
        if answers_when_asked_again(d, raw, why):
            return                          # it was only us that were paused
        why = report_crash(d, raw, why)     # said, and its logs kept in prev/
        verb = "starting" if why.outcome in (NO_DAEMON, CRASHED) else "restarting"
        say(f"{verb} {DAEMON}: {why.text}")
        kill_daemon(d, f"{DAEMON} was restarted by pid {os.getpid()}: {why.text}")   # 2-3. kill it
        start_daemon(d, isolation, why)     # 4-5. run `buck daemon`, wait until it serves


def wait_while_a_buckd_starts(d):
    """Wait, START_TIMEOUT at most from its start, for a buckd holding buckd.pid but not yet named
    in buckd.info: it is starting."""
    pid = holder(d)
    named = lambda: (read_info(d) or {}).get("pid") == pid
    try:
        age = time.time() - os.lstat(os.path.join(d, PID_FILE)).st_mtime
    except OSError:
        return
    if pid and 0 <= age < START_TIMEOUT and not named():
        poll(lambda: holder(d) != pid or named(), START_TIMEOUT - age)


def answers_when_asked_again(d, raw, why):
    """Ask a buckd that did not answer once more: maybe *we* were paused (Ctrl-Z, sleep)."""
    return why.outcome == NOT_USABLE and not isinstance(check_version(d, raw, RECHECK_TIMEOUT), Why)


def refuse_to_restart_here(d, why):
    """Fail if our own files changed on disk, or if this command runs inside the buckd to kill."""
    if checksum() != version():
        raise Fail(f"{TOOL}'s files changed on disk since this command started (an upgrade?): "
                   "run it again; killing nothing")
    if runs_this_command(d):
        raise Fail(f"this command runs inside {DAEMON} (pid {holder(d)}), which it would have "
                   f"to restart ({why.text}): refusing to kill the {DAEMON} that runs it")


def report_crash(d, raw, why):
    """Why we start buckd, in full. If the buckd that buckd.info names is gone without a clean
    recorded end, it crashed: say so with its log, keep its logs in prev/, drop its buckd.info."""
    info = parse_info(raw)
    if info and holder(d) is None:
        end = end_record(d)
        if end.get("pid") != info["pid"] or end.get("how") in (None, "panic"):
            keep_logs(d)
            say(f"{DAEMON} crashed, see {crash_log(d, info['pid'])}")
            ended = how_it_ended(d, info["pid"]) or "no record"
            os.unlink(os.path.join(d, INFO_FILE))      # said once: the next client starts afresh
            return Why(CRASHED, f"{DAEMON} (pid {info['pid']}) crashed or vanished ({ended})")
    elif why.outcome != NO_DAEMON:
        return why
    last = how_it_ended(d, last_pid(d))     # (it may have ended just now: idle...)
    return Why(NO_DAEMON, f"no {DAEMON} was running" + (f" (the last one, {last})" if last else ""))


# Correctness 2, "Only a single client is killing/starting a buckd at a time": "When the client
# is killing or starting the buckd process, it will grab an exclusive lock on the
# "lifecycle.lock" file". A flock: the kernel releases it when its holder dies, however.
class LifecycleLock:
    """lifecycle.lock, held within `with` (restart's steps 1 and 6), its holder's words in it.
    until: a time.monotonic() at which to give up, naming the holder (killall); else we wait."""

    def __init__(self, d, until=None):
        self.d, self.path, self.until = owned(d), os.path.join(d, LOCK_FILE), until
        os.makedirs(d, exist_ok=True)
        self.fd = open_file(self.path, os.O_RDWR | os.O_CREAT | NOFOLLOW)
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):     # (a FIFO, a device: no lock to take)
            os.close(self.fd)
            raise OSError(0, "not a regular file", self.path)

    def take(self):
        """Take the lock if it is free; never wait."""
        with suppress(BlockingIOError):
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        return False

    def holder_words(self):
        return printable(os.pread(self.fd, 200, 0).decode(errors="replace").strip())

    def __enter__(self):
        try:
            self.wait()
            os.ftruncate(self.fd, 0)    # held: say who holds it, for those who wait
            os.pwrite(self.fd, f"pid {os.getpid()}: {command_line()}\n".encode(), 0)
        except BaseException:
            os.close(self.fd)           # our only fd of it: a lock taken is released too
            raise
        held_locks.add(self.d)          # first: a Ctrl-C from here on still logs restart.6
        step("restart.1", self.d)
        return self

    def wait(self):
        """Take the lock: wait, saying for whom, up to LOCK_TIMEOUT; or fail at `until`."""
        waits = self.until is None
        if poll(self.take, LOCK_PATIENCE if waits else self.until - time.monotonic()):
            return
        if not waits:
            raise Fail(f"another {TOOL} client holds its {LOCK_FILE}: {self.holder_words()}")
        say(f"waiting for another {TOOL} client to finish starting or killing {DAEMON}: "
            f"{self.holder_words()}")
        if not poll(self.take, LOCK_TIMEOUT):
            waited = f"timed out after {LOCK_TIMEOUT:.0f} s waiting for {LOCK_FILE}"
            raise Fail(f"{waited} (held by: {self.holder_words()})")

    def __exit__(self, *exception):
        step("restart.6", self.d)
        held_locks.discard(self.d)
        os.close(self.fd)           # our only fd of it: closing it releases the flock


def command_line():
    return printable(" ".join([TOOL, *sys.argv[1:]]))


def kill_daemon(d, reason):
    """Steps 2-3 in one daemon dir: the pid killed, or None if no buckd ran."""
    killed, left = kill_daemons([d], reason)
    if left:
        raise Fail(left[d])
    return killed[d]


def kill_daemons(dirs, reason):
    """Steps 2-3 in each dir at once: ask its buckd to exit, then see it gone by pid (SIGTERM,
    then SIGKILL). Returns ({dir: pid killed, or None}, {dir: why its buckd still runs})."""
    running, calls = {}, {}
    for d in dirs:
        pid = running[d] = holder(d)
        step("restart.2", d, daemon_pid=pid, reason=reason)
        info = read_info(d)
        if pid is not None and info and info["pid"] == pid:
            calls[d] = Connection(info).kill(reason)        # all under way at once
    running = {d: pid for d, pid in running.items() if pid is not None}
    how = {d: "rpc" for d, call in calls.items() if call.exception() is None}
    for d in running.keys() - how.keys():   # the same request, as a signal: buckd exits cleanly
        how[d] = "sigterm"
        signal_buckd(d, running[d], signal.SIGTERM, reason)
    left = still_running(running)
    for d in left:                          # the last resort
        how[d] = "sigkill"
        signal_buckd(d, running[d], signal.SIGKILL, reason)
    left = still_running({d: running[d] for d in left})
    for d, pid in running.items():
        if d not in left and how[d] == "sigkill" and (read_info(d) or {}).get("pid") == pid:
            os.unlink(os.path.join(d, INFO_FILE))   # it could not remove its buckd.info: we do
        if d not in left:
            step("restart.3", d, daemon_pid=pid, how=how[d])
    killed = {d: running.get(d) for d in dirs if d not in left}
    return killed, {d: f"could not kill {DAEMON} (pid {running[d]})" for d in left}


def still_running(running):
    """The dirs of `running` ({dir: pid}) whose buckd still holds buckd.pid after EXIT_TIMEOUT."""
    left = lambda: [d for d, pid in running.items() if holder(d) == pid]
    poll(lambda: not left(), EXIT_TIMEOUT)
    return left()


def signal_buckd(d, pid, sig, reason):
    """Record who kills pid and why, then signal it, only if it holds buckd.pid's lock."""
    if pid > 1 and pid != os.getpid() and holder(d) == pid:
        if end_record(d).get("how") in (None, "kill"):   # (unless buckd has said how it ends)
            end = {"pid": pid, "how": "kill", "why": f"{reason} ({sig.name})"}
            write_json(os.path.join(d, END_FILE), end)        # (a signal does not say who, or why)
        try:
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)    # a stopped buckd acts on it now
        except ProcessLookupError:
            pass                    # it has just exited


def start_daemon(d, isolation, why):
    """Steps 4-5: run `buck daemon` (why in its env) until buckd serves; exit 3, a kill: retry."""
    import subprocess
    told = f"{why.text} (by pid {os.getpid()}: {command_line()})"
    argv = [sys.executable, os.path.realpath(buck.__file__), "--isolation-dir", isolation, "daemon"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, STARTED_ENV: told})
    load_grpc()                     # our own grpc import overlaps the daemon's start
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        kill_daemon(d, "it did not start in time")
        raise Fail(f"{DAEMON} did not start within {START_TIMEOUT:.0f} s, see {crash_log(d, None)}")
    step("restart.4", d, exit=proc.returncode, why=why.text)
    if proc.returncode == 0:
        step("restart.5", d, daemon_pid=holder(d))
    elif proc.returncode > 0 and proc.returncode != EXIT_ALREADY_RUNNING:
        said = (err.decode(errors="replace").strip().splitlines() or ["no reason given"])[-1]
        raise Fail(f"{DAEMON} failed to start: {said.removeprefix(f'{TOOL}: ')}")


# --- "buck kill and other daemon restarts"; then a command that buckd runs

def cmd_kill(isolation, options):
    """`buck kill`: steps 1-3 and 6 of "start/restart"; the user's word, even from inside buckd."""
    d = daemon_dir(isolation)
    with LifecycleLock(d):
        pid = kill_daemon(d, f"`{TOOL} kill` was invoked by pid {os.getpid()}")
    out(f"{DAEMON} killed (pid {pid})\n" if pid is not None else f"no {DAEMON} running\n")
    return 0


def run_command(d, isolation, name, operands, options):
    """Send a command to a buckd whose version we checked; resend only until one accepts it."""
    load_grpc()
    request = pb.CommandRequest(name=name, args=[os.fsencode(a) for a in operands], options=options,
                                cwd=os.fsencode(os.getcwd()), client_pid=os.getpid(),
                                argv=[os.fsencode(word) for word in sys.argv[1:]])
    for conn, reply in connect(d, isolation):       # (each a new connection: see ATTEMPTS)
        events = buck_commands.send(conn, request)
        if events is not None:      # accepted: from here on, never resend
            break
    step("command", d, daemon_pid=reply.pid, name=name)
    return buck_commands.show_events(d, reply.pid, events)

