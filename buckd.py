# SPDX-License-Identifier: MIT OR Apache-2.0.
# Upstream file of buckd: replace it on upgrade, never edit it.
"""buckd, the buck daemon, and its daemon dir's files, after daemon_lifecycle.md (link: buck.py):
first the files, as buckd writes and clients read them; then "daemon process flow" in its order:
`buck daemon` daemonizes (main), buckd starts (run) and serves until it must shut down (serve)."""
import fcntl, os, select, signal, stat, struct, sys, threading, time
from contextlib import suppress

import buck
from buck import (DAEMON, END_FILE, INFO_FILE, PID_FILE, PREV_DIR, STDERR_FILE, STDOUT_FILE,
                  TOOL, printable)

GRACE = 2.0             # seconds running commands get, at shutdown, to say why they end
MAX_COMMANDS = 256      # commands running at once; one more is refused: buckd is busy
SPARE_THREADS = 16      # server threads beyond those: Status and Kill never queue
NOFOLLOW = os.O_NOFOLLOW    # every file of a daemon dir: a planted symlink is refused, not followed
grpc = pb = None        # imported after daemonizing: grpc must not cross a fork


# --- The daemon dir's files: buckd.pid, buckd.info, buckd.end, the logs and prev/

def holder(d):
    """The running buckd's pid: who holds buckd.pid's lock, as the kernel says; or None."""
    linux = sys.platform.startswith("linux")    # struct flock's form differs on macOS, BSD
    form = "hhqqi" if linux else "qqihh"
    query = (fcntl.F_WRLCK, 0, 0, 0, 0) if linux else (0, 0, 0, fcntl.F_WRLCK, 0)
    try:
        fd = buck.open_file(os.path.join(d, PID_FILE), os.O_RDONLY | NOFOLLOW)
        try:
            answer = struct.unpack(form, fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(form, *query)))
        finally:
            os.close(fd)
    except OSError:                 # no file, a link, none one can lock (a FIFO): no buckd holds it
        return None
    kind, pid = (answer[0], answer[4]) if linux else (answer[3], answer[2])
    return None if kind == fcntl.F_UNLCK else pid


def named_pid(text):
    """The pid that buckd.pid's text names (the last buckd to lock it), or None."""
    word = (text or b"").split(b"\n")[0]
    return int(word) if word.isdigit() and len(word) < 10 else None


def last_pid(d):
    return named_pid(buck.read_file(os.path.join(d, PID_FILE), NOFOLLOW))


def read_info(d):
    return parse_info(buck.read_file(os.path.join(d, INFO_FILE), NOFOLLOW))


def parse_info(raw):
    """buckd.info as a dict, or None if it is not a complete, valid one, whatever is wrong."""
    import json
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
    import json
    try:
        end = json.loads(buck.read_file(os.path.join(where, END_FILE), NOFOLLOW) or b"")
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
    path = next((p for p in paths if mark in (buck.read_file(p, NOFOLLOW, 200) or b"")), paths[0])
    tail = b""
    with suppress(OSError):
        fd = buck.open_file(path, os.O_RDONLY | NOFOLLOW)
        try:
            tail = os.pread(fd, 8192, max(0, os.fstat(fd).st_size - 8192))    # never the whole log
        finally:
            os.close(fd)
    lines = tail.decode(errors="replace").splitlines()[-20:]
    return printable(path) + "".join(f"\n  | {line}" for line in lines)


# "There are 3 ways that the buckd process will shutdown"; the records say which one it was.
def record_end(api, how, why):
    """Say in END_FILE how we end, while it names us without an end (no killer said why first)."""
    ours = {"pid": os.getpid()}
    with suppress(OSError):
        if end_record(api.dir) == ours:
            buck.write_json(os.path.join(api.dir, END_FILE), {**ours, "how": how, "why": why})


def all_daemon_dirs():
    """The user's daemon dirs (with a buckd.pid or buckd.info), and [(dir, why)] of those unread."""
    found, unread, seen, todo = [], [], set(), [buck.daemons_home()]
    while todo:
        d = todo.pop()
        try:
            st = os.stat(d)
            with os.scandir(d) as listing:
                entries = list(listing)
        except FileNotFoundError:
            continue
        except OSError as e:
            unread.append((d, e.strerror))
            continue
        if (st.st_dev, st.st_ino) not in seen:      # a folder linked in twice: once
            seen.add((st.st_dev, st.st_ino))
            found += [d] if {PID_FILE, INFO_FILE} & {e.name for e in entries} else []
            todo += [e.path for e in entries if e.is_dir()]
    return sorted(found), unread


# --- "daemon process flow": "started with the (hidden) `buck daemon` command".
def main(d, root):
    """`buck daemon`: start buckd; 0 once it serves, 3 if one runs, 2 bad setting, else 1."""
    settings = buck.daemon_settings()
    by_hand = f"started by hand (`{TOOL} daemon`, by pid {os.getppid()})"
    why = os.environ.pop(buck.STARTED_ENV, by_hand)
    for name in buck.SETTINGS:      # what we run inherits none: a setting is live (Configure)
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
        buck.to_stderr(f"{message}\n".encode() if message else b"")
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
        short = printable(name).encode()[:15].decode(errors="ignore").encode()
        ctypes.CDLL(None).prctl(15, short, 0, 0, 0)


def run(api, ready):
    try:
        lock_pid_file(api)                      # "write its pid to a locked file buckd.pid"
        step(api, "daemon.locked")
        record_start(api)
        redirect_stdio(api)                     # "It redirects its stdout and stderr to files"
        server = start_server(api)              # "starts up the grpc DaemonApi server"
        write_info(api)                         # "write the port ... to the buckd.info file"
    except OSError as e:
        return startup_failed(api, ready, e)
    step(api, "daemon.serving", port=api.port)
    log(f"serving on 127.0.0.1:{api.port}")
    report_ready(ready, 0, "")                  # "Once that is done, the server is ready"
    how, reason = serve(api)
    api.shutdown(reason)
    step(api, "daemon.shutdown", reason=reason, path=how)
    log(f"shutting down ({how}): {reason}")
    record_end(api, how, reason)
    server.stop(GRACE).wait()                   # running commands get to say why they end
    remove_info(api)
    step(api, "daemon.exit")
    return 0


def step(api, name, **fields):
    buck.step(name, api.dir, role="daemon", refuse=api.pid_stat, **fields)


def startup_failed(api, ready, e):
    """Tell `buck daemon` why buckd cannot start (3: another holds buckd.pid: "only a single")."""
    problem = f"{printable(e.filename)}: {e.strerror}" if e.filename else str(e)
    if api.pid_stat is None and (pid := holder(api.dir)) is not None:
        return report_ready(ready, buck.EXIT_ALREADY_RUNNING,
                            f"{DAEMON} is already running for {printable(api.dir)} (pid {pid})")
    if api.pid_stat is not None:                # we hold buckd.pid: the records say we end
        step(api, "daemon.shutdown", reason=problem, path="startup")
        record_end(api, "startup failure", problem)
        remove_info(api)
        step(api, "daemon.exit")
    verb = "lock" if api.pid_stat is None else "start"
    return report_ready(ready, buck.EXIT_FAILED, f"{DAEMON} cannot {verb}: {problem}")


def report_ready(ready, code, message):
    """Give `buck daemon` its exit code and message; if it is gone, carry on."""
    with suppress(OSError):
        os.write(ready, f"{code} {message}".encode(errors="backslashreplace"))
    os.close(ready)
    return code


# Correctness 1, "Only a single buckd is running at a time": buckd.pid is "locked exclusively
# by the daemon process until it exits". A POSIX record lock, so that clients can ask the
# kernel who holds it (holder); it drops when we close *any* fd of the file: so buck.open_file
# refuses that file in buckd (api.pid_stat), whatever its name.
def lock_pid_file(api):
    path = os.path.join(api.dir, PID_FILE)
    fd = buck.open_file(path, os.O_RDWR | os.O_CREAT | NOFOLLOW)
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
        buck.write_json(os.path.join(api.dir, END_FILE), {"pid": os.getpid()})


def redirect_stdio(api):
    """"It redirects its stdout and stderr to files", then logs who we are and why we run."""
    new = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NOFOLLOW
    files = [(os.devnull, os.O_RDONLY), (os.path.join(api.dir, STDOUT_FILE), new),
             (os.path.join(api.dir, STDERR_FILE), new)]
    for fd, (path, flags) in enumerate(files):
        opened = buck.open_file(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # (or None)
    log(f"{DAEMON} pid {os.getpid()} version {api.version} starting in {api.dir}")
    log(f"started because: {api.why}; the previous {DAEMON}: {api.previous}")


def write_info(api):
    info = {"pid": os.getpid(), "port": api.port, "version": api.version,
            "auth_token": api.token, "start_time": api.start_time}
    buck.write_json(os.path.join(api.dir, INFO_FILE), info)
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
    checked, marker_missing = time.monotonic(), False
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
            was_missing = marker_missing            # gone means gone at two checks in a row
            marker_missing = not os.path.isfile(os.path.join(api.root, buck.MARKER))
            if marker_missing and was_missing:
                return "repository gone", f"{printable(api.root)} or its {buck.MARKER} is gone"
            checked = now
        if api.idle_timeout and not api.commands and now >= api.idle_since + api.idle_timeout:
            return "idle", f"no command for {api.idle_timeout:g} s ({buck.IDLE_TIMEOUT_ENV})"


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
    traceback.print_exception(error)
    step(api, "daemon.shutdown", reason=f"panic: {error!r}", path="panic")
    record_end(api, "panic", repr(error))
    step(api, "daemon.exit")
    sys.stderr.flush()
    os._exit(buck.EXIT_PANIC)


def panics(method):
    """A servicer method whose exception is a panic (grpc would answer UNKNOWN and serve on)."""
    def guarded(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            panic(self, e)
    return guarded


def start_server(api):
    """The DaemonApi on 127.0.0.1: a thread per command (MAX_COMMANDS), and spares."""
    global grpc, pb
    import socket
    from concurrent.futures import ThreadPoolExecutor
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    grpc, pb, pb_grpc = buck.load_grpc()
    os.environ[buck.INSTANCE_ENV] = instance(os.getpid(), api.start_time)     # before any thread
    server = grpc.server(ThreadPoolExecutor(MAX_COMMANDS + SPARE_THREADS),
                         interceptors=[require_token(api.token)],
                         options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_DaemonApiServicer_to_server(api, server)
    try:
        api.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        socket.create_connection(("127.0.0.1", api.port), timeout=buck.STATUS_TIMEOUT).close()
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
            given = dict(details.invocation_metadata).get(buck.TOKEN_KEY, "").encode()
            return continuation(details) if hmac.compare_digest(given, token.encode()) else deny
    return RequireToken()


class DaemonApi:
    """All buckd knows, and the DaemonApi it serves."""

    def __init__(self, d, root, why, check_interval_s, idle_timeout_s):
        self.dir, self.root, self.why, self.version = d, root, printable(why), buck.version()
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
        now, usage = time.monotonic(), resource_usage()
        with self.lock:
            running = [pb.RunningCommand(argv=[word.decode(errors="backslashreplace")
                                               for word in request.argv],
                                         running_s=now - started, client_pid=request.client_pid)
                       for request, started in self.commands.values() if request]
            idle = 0 if self.commands else now - self.idle_since
        settings = pb.Settings(check_interval_s=self.check_interval,
                               idle_timeout_s=self.idle_timeout)
        return pb.StatusResponse(
            pid=os.getpid(), port=self.port, version=self.version, daemon_dir=printable(self.dir),
            start_time=self.start_time, uptime_s=time.time() - self.start_time,
            active_commands=len(self.commands), idle_s=idle, started_because=self.why,
            previous_end=self.previous, figures=buck.workload.status(), settings=settings,
            commands=running, **usage)

    @panics
    def Configure(self, request, context):
        """A client's daemon settings, applied live: serve() reads them when it wakes."""
        try:
            for name, (field, *_) in buck.SETTINGS.items():
                buck.setting(name, str(getattr(request, field)))
        except buck.Fail as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.check_interval, self.idle_timeout = request.check_interval_s, request.idle_timeout_s
        self.wake.poke()
        return request

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
        """One command, by daemon.proto's handshake; bad requests end their own call."""
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
            request = running[0] = next(requests, None)
            if problem := malformed(request):
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(problem)
                return
            yield pb.CommandEvent(accepted=True)
            if next(requests, None) is None:        # no go-ahead: the client has gone
                return
            code = yield from run_workload(request, stop, self.pid_stat)
            if code is not None:                    # it ran to its end
                yield pb.CommandEvent(exit_code=code)
            elif self.reason:                       # it was stopped by the shutdown
                yield pb.CommandEvent(shutdown=self.reason)
        except grpc.RpcError:
            return                  # the client went away during the handshake
        except Exception as e:
            panic(self, e)
        finally:
            with self.lock:         # the handler has returned: no longer running; idle from now
                del self.commands[stop]
                self.idle_since = time.monotonic()


def resource_usage():
    """buckd's memory (RSS now and at peak) and CPU time, as buck2's `status --snapshot`."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)     # (bytes on macOS)
    statm = (buck.read_file("/proc/self/statm") or b"0 0").split()
    rss = int(statm[1]) * os.sysconf("SC_PAGE_SIZE") or peak
    cpu = usage.ru_utime + usage.ru_stime
    return {"rss_bytes": rss, "peak_rss_bytes": max(peak, rss), "cpu_s": cpu}


def malformed(request):
    """What is wrong with a Command request that no handler should see, or None."""
    if request is None:
        return "no command was sent"
    if request.name not in buck.workload_commands():
        return f"no command {printable(request.name)}"
    if not os.path.isabs(request.cwd):
        return f"cwd must be an absolute path, not {printable(request.cwd)}"
    if any(b"\0" in arg for arg in [request.cwd, *request.args]):
        return "a path with a NUL byte"
    return None


def run_workload(request, stop, pid_stat):
    """Run a workload command: its events as CommandEvents, then its exit code."""
    from functools import partial
    from types import SimpleNamespace
    call = SimpleNamespace(args=list(request.args), options=dict(request.options), cwd=request.cwd,
                           stop=stop, open=partial(buck.open_file, refuse=pid_stat))
    try:
        buck.check_usage(request.name, call.args, call.options)
        events = buck.workload_commands()[request.name][2](call)
        while True:
            try:
                kind, data = next(events)
            except StopIteration as end:
                return end.value
            yield pb.CommandEvent(**{kind: data})
    except buck.Fail as e:                      # said as the client says its own
        message = buck.usage_error(request.name, e) if e.code == buck.EXIT_USAGE else e
        yield pb.CommandEvent(stderr=f"{TOOL}: {message}\n".encode(errors="backslashreplace"))
        return e.code
