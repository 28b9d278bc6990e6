# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""buckd, the buck daemon: "daemon process flow" of daemon_lifecycle.md (link: buck.py), in its
order: `buck daemon` daemonizes (main); buckd locks buckd.pid, redirects its output, serves the
DaemonApi, writes buckd.info (run), until one of the ways to shut down (serve)."""
import fcntl, hmac, os, select, signal, stat, sys, threading, time, traceback
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import buck
from buck import DAEMON, INFO_FILE, PID_FILE, STDERR_FILE, STDOUT_FILE, TOOL, step

GRACE = 2.0             # seconds running commands get, at shutdown, to say why they end
MAX_COMMANDS = 256      # commands running at once; one more is refused: buckd is busy
SPARE_THREADS = 16      # server threads beyond those: Status and Kill never queue
grpc = pb = None        # imported after daemonizing: grpc must not cross a fork
ours = {}               # "dir": the daemon dir, once we hold its buckd.pid


# "The daemon process is started with the (hidden) `buck daemon` command."
def main(d, root):
    """`buck daemon`: start buckd; 0 once it serves, 3 if one runs, 2 bad setting, else 1."""
    interval, idle = buck.daemon_settings()
    why = os.environ.pop(buck.STARTED_ENV, f"started by hand (`{TOOL} daemon`, by pid {os.getppid()})")
    buck.trace["role"] = "daemon"
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
    try:
        os._exit(run(d, root, interval, idle, why, ready=write_end))
    except BaseException as e:
        panic(e)


def daemonize(name):
    """The classic recipe (Stevens, APUE 13.3; PEP 3143), each step for a reason."""
    os.setsid()                     # a session of our own: no terminal, no client's signals
    if os.fork():
        os._exit(0)                 # not a session leader: can never acquire a terminal
    os.chdir("/")                   # keep no directory busy
    os.umask(0o077)                 # every file we create is private
    try:                            # our name in `ps` and `top`, which our threads inherit
        import ctypes               # (Linux: PR_SET_NAME, 15 bytes; elsewhere we stay python)
        ctypes.CDLL(None).prctl(15, os.fsencode(name)[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def run(d, root, interval, idle, why, ready):
    """buckd from start to exit, as "daemon process flow" tells it."""
    wake = watch_signals()
    try:
        pid_fd = lock_pid_file(d)               # "write its pid to a locked file buckd.pid"
        step("daemon.locked")
        redirect_stdio(d)                       # "It redirects its stdout and stderr to files"
        previous = log_start(d, why)
        server, api = start_server(d, wake[1], why, previous)   # "starts up the DaemonApi"
        info_id = write_info(d, api)            # "write the port ... to the buckd.info file"
    except OSError as e:
        return startup_failed(d, ready, e)
    step("daemon.serving", port=api.port)
    log(f"serving on 127.0.0.1:{api.port}")
    tell(ready, 0, "")                          # "Once that is done, the server is ready"
    how, reason = serve(api, d, root, pid_fd, info_id, wake[0], interval, idle)
    api.shutdown(reason)
    step("daemon.shutdown", reason=reason, path=how)
    log(f"shutting down ({how}): {reason}")
    record_end(how, reason)
    server.stop(GRACE).wait()                   # running commands get to say why they end
    if still_ours(INFO_FILE, info_id):
        os.unlink(os.path.join(d, INFO_FILE))
    step("daemon.exit")
    return 0


def startup_failed(d, ready, e):
    """Tell `buck daemon` why buckd cannot start (3: another holds buckd.pid: "only a single")."""
    if ours:                                    # (we hold buckd.pid: the log must say we end)
        step("daemon.shutdown", reason=str(e), path="startup")
        step("daemon.exit")
    elif (pid := buck.holder(d)) is not None:
        return tell(ready, buck.EXIT_ALREADY_RUNNING,
                    f"{DAEMON} is already running for {buck.shown(d)} (pid {pid})")
    return tell(ready, buck.EXIT_FAILED, f"{DAEMON} cannot {'start' if ours else 'lock'} "
                f"{buck.shown(e.filename or '?')}: {e.strerror}")


def watch_signals():
    """SIGTERM, SIGINT wake serve() by a pipe, as Kill does (a handler can run under any lock)."""
    wake = os.pipe()
    for fd in wake:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake[1])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    return wake


# "write its pid to a locked file "buckd.pid" ... locked exclusively by the daemon process
# until it exits". A POSIX record lock, so that clients can ask the kernel who holds it
# (buck.holder); it drops when we close *any* fd of the file: buck.open_file refuses it.
def lock_pid_file(d):
    """Lock buckd.pid, then write our pid in it (truncate only once locked)."""
    fd = buck.open_file(os.path.join(d, PID_FILE), os.O_RDWR | os.O_CREAT)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", os.path.join(d, PID_FILE))
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)                # we hold no lock on it: closing it drops nothing
        raise
    ours["dir"] = d
    buck.own_pid_file = os.fstat(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def redirect_stdio(d):
    """"It redirects its stdout and stderr to files"; the last buckd's move to prev/."""
    buck.keep_logs(d)
    new = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, os.path.join(d, STDOUT_FILE), new),
                            (2, os.path.join(d, STDERR_FILE), new)):
        opened = buck.open_file(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # (or None)


def log_start(d, why):
    """Log (first line: our pid) and record in END_FILE that we run; return how the last ended."""
    previous = buck.how_it_ended(d) or "none known"
    log(f"{DAEMON} pid {os.getpid()} version {buck.version()} starting in {d}")
    log(f"started because: {why}; the previous {DAEMON}: {previous}")
    buck.write_json(os.path.join(d, buck.END_FILE), {"pid": os.getpid()})
    return previous


def tell(ready, code, message):
    """Give `buck daemon` its exit code and message; if it is gone, carry on."""
    try:
        os.write(ready, f"{code} {message}".encode(errors="backslashreplace"))
    except OSError:
        pass
    os.close(ready)
    return code


def write_info(d, api):
    info = {"pid": os.getpid(), "port": api.port, "version": api.version,
            "auth_token": api.token, "start_time": api.start_time}
    buck.write_json(os.path.join(d, INFO_FILE), info)
    return file_id(os.path.join(d, INFO_FILE))


def file_id(path):
    """What tells a file, and a rewrite of it, apart without opening it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def still_ours(name=None, name_id=None):
    """Is buckd.pid the file we hold, and `name` the file we wrote? (Else a newer buckd's.)"""
    try:
        pid_file = os.path.samestat(os.stat(os.path.join(ours["dir"], PID_FILE)), buck.own_pid_file)
        return pid_file and (name is None or file_id(os.path.join(ours["dir"], name)) == name_id)
    except OSError:
        return False


def record_end(how, reason):
    """Record in END_FILE how we end, unless a client that signalled us did, or it is not ours."""
    try:
        if ours and still_ours() and not buck.end_record(ours["dir"]).get("how"):
            end = {"pid": os.getpid(), "how": how, "why": reason}
            buck.write_json(os.path.join(ours["dir"], buck.END_FILE), end)
    except OSError:
        pass


def log(message):
    print(time.strftime("%Y-%m-%d %H:%M:%S"), message, file=sys.stderr, flush=True)


# "There are 3 ways that the buckd process will shutdown"; and a signal, idleness, a lost repo.
def serve(api, d, root, pid_fd, info_id, wake, interval, idle):
    """Wait until buckd must shut down; return (how, why). (A panic exits from anywhere.)"""
    next_check = time.monotonic() + interval
    while True:
        idle_at = (time.monotonic() if api.active else api.last_used) + idle if idle else float("inf")
        if select.select([wake], [], [], max(0, min(next_check, idle_at) - time.monotonic()))[0]:
            signals = [s for s in os.read(wake, 512) if s]     # 0 is the Kill call's byte
            if api.reason:
                return "kill", api.reason                                       # 1. kill()
            if signals:
                return "signal", f"{DAEMON} received {signal.Signals(signals[0]).name}"
        now = time.monotonic()
        if now >= next_check:
            if reason := check_files_still_ours(d, pid_fd, info_id):
                return "self-check", reason                                     # 2.
            if not os.path.isfile(os.path.join(root, buck.MARKER)):           # (as buck2 does)
                return "repository gone", f"{buck.shown(root)} or its {buck.MARKER} is gone"
            next_check = now + interval
        if idle and not api.active and now >= api.last_used + idle:
            return "idle", f"no client for {idle:g} s ({buck.IDLE_TIMEOUT_ENV})"


# Shutdown path 2: "buckd will periodically (every 100s or so) check the "buckd.pid" and
# "buckd.info" files to ensure that they still match that buckd process."
def check_files_still_ours(d, pid_fd, info_id):
    """Why buckd must exit, or None while buckd.pid and buckd.info name it (opening neither)."""
    if not os.path.exists(os.path.join(d, PID_FILE)):
        return f"{PID_FILE} was removed"
    if not still_ours():
        return f"{PID_FILE} was replaced"
    if os.pread(pid_fd, 64, 0) != f"{os.getpid()}\n".encode():
        return f"{PID_FILE} names another process"
    if not still_ours(INFO_FILE, info_id):
        return f"{INFO_FILE} was removed or rewritten"
    return None


# Shutdown path 3: "If buckd hits a rust `panic()` the buckd process will exit"
def panic(error):
    """A bug of buckd's own, wherever it happens: log its traceback, exit at once."""
    traceback.print_exception(error)
    step("daemon.shutdown", reason=f"panic: {error!r}", path="panic")
    record_end("panic", repr(error))
    step("daemon.exit")
    sys.stderr.flush()
    os._exit(buck.EXIT_PANIC)


def panics(method):
    """A servicer method whose exception is a panic (grpc would answer UNKNOWN and serve on)."""
    def guarded(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            panic(e)
    return guarded


def start_server(d, wake, why, previous):
    """The DaemonApi on 127.0.0.1: a thread per command (MAX_COMMANDS), and spares."""
    global grpc, pb
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    grpc, pb, pb_grpc = buck.load_grpc()
    api = DaemonApi(d, wake, why, previous)
    mark = buck.instance({"pid": os.getpid(), "start_time": api.start_time})
    os.environ[buck.INSTANCE_ENV] = mark        # before any thread: what our commands start inherit
    server = grpc.server(ThreadPoolExecutor(MAX_COMMANDS + SPARE_THREADS),
                         interceptors=[require_token(api.token)], options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_DaemonApiServicer_to_server(api, server)
    api.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, api


def require_token(token):
    """An interceptor refusing every call that lacks this buckd's token (constant-time)."""
    deny = grpc.unary_unary_rpc_method_handler(
        lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad auth token"))

    class RequireToken(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            given = dict(details.invocation_metadata).get(buck.TOKEN_KEY, "").encode()
            return continuation(details) if hmac.compare_digest(given, token.encode()) else deny
    return RequireToken()


class DaemonApi:
    """The servicer. `lock` guards `active` and `reason`; it is never taken in a signal handler."""

    def __init__(self, d, wake, why, previous):
        self.dir, self.version, self.wake, self.port = d, buck.version(), wake, 0
        self.why, self.previous = buck.shown(why), buck.shown(previous)     # valid UTF-8
        self.token = os.urandom(16).hex()
        self.start_time, self.last_used = time.time(), time.monotonic()  # last: for idleness
        self.lock = threading.Lock()
        self.active = set()         # an Event per running command, set to stop it
        self.reason = None          # why buckd is shutting down

    @panics
    def Status(self, request, context):
        idle, self.last_used = 0 if self.active else time.monotonic() - self.last_used, time.monotonic()
        return pb.StatusResponse(
            pid=os.getpid(), port=self.port, version=self.version, daemon_dir=buck.shown(self.dir),
            start_time=self.start_time, uptime_s=time.time() - self.start_time,
            active_commands=len(self.active), idle_s=idle, started_because=self.why,
            previous_end=self.previous, figures=buck.workload.status())

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
                for stop in self.active:
                    stop.set()
        try:
            os.write(self.wake, b"\0")
        except BlockingIOError:
            pass                    # the pipe is full: serve() wakes anyway

    def Command(self, requests, context):
        """One command, by daemon.proto's handshake; bad requests end their own call."""
        stop = threading.Event()
        with self.lock:             # counted from the start: a stream holds a thread
            if self.reason is not None:     # not accepted: the client may send it elsewhere
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{DAEMON} is shutting down")
            if len(self.active) >= MAX_COMMANDS:
                busy = f"{DAEMON} is busy: {MAX_COMMANDS} run"
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
            self.active.add(stop)
        if not context.add_callback(stop.set):      # the call ends: the client went away
            stop.set()
        try:
            request = next(requests, None)
            if problem := malformed(request):
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(problem)
                return
            yield pb.CommandEvent(accepted=True)
            if next(requests, None) is None:        # no go-ahead: the client has gone
                return
            code = yield from run_workload(request, stop)
            if code is not None:                    # it ran to its end
                yield pb.CommandEvent(exit_code=code)
            elif self.reason:                       # it was stopped by the shutdown
                yield pb.CommandEvent(shutdown=self.reason)
        except grpc.RpcError:
            return                  # the client went away during the handshake
        except Exception as e:
            panic(e)
        finally:
            with self.lock:         # the handler has returned: no longer active
                self.active.discard(stop)
                self.last_used = time.monotonic()


def malformed(request):
    """What is wrong with a Command request that no handler should see, or None."""
    if request is None:
        return "no command was sent"
    if request.name not in buck.workload_commands():
        return f"no command {buck.shown(request.name)}"
    if not os.path.isabs(request.cwd):
        return f"cwd must be an absolute path, not {buck.shown(request.cwd)}"
    if any(b"\0" in arg for arg in [request.cwd, *request.args]):
        return "a path with a NUL byte"
    return None


def run_workload(request, stop):
    """Run a workload command: its events as CommandEvents, then its exit code."""
    call = SimpleNamespace(args=list(request.args), options=dict(request.options), cwd=request.cwd,
                           stop=stop, open=buck.open_file)
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
