"""buckd: the buck daemon. This file holds "daemon process flow" of buck2's daemon_lifecycle.md
(https://github.com/facebook/buck2/blob/main/app/buck2_daemon/daemon_lifecycle.md), in its
order: `buck daemon` daemonizes (main); buckd locks buckd.pid, redirects its output, serves
the DaemonApi and writes buckd.info (run); then it serves until one of the ways to shut down
(serve). The commands it runs are workload.py's, through one seam: workload.COMMANDS.
"""
import fcntl
import hmac
import json
import os
import select
import signal
import stat
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import buck
from buck import DAEMON, INFO_FILE, PID_FILE, STDERR_FILE, STDOUT_FILE, TOOL, step

GRACE = 2.0             # seconds running commands get, at shutdown, to say why they end
MAX_COMMANDS = 256      # commands running at once; one more is refused: buckd is busy
SPARE_THREADS = 16      # server threads beyond those: Status and Kill never queue
grpc = pb = workload = None     # imported after daemonizing: grpc must not cross a fork
ours = {}               # "dir" and "pid_fd" once buckd.pid is locked: what a panic records in


# "The daemon process is started with the (hidden) `buck daemon` command."
def main(d, root):
    """`buck daemon`: start buckd for daemon dir `d` of repository `root`. Returns `buck daemon`'s
    exit code: 0 once buckd serves, 3 if another buckd holds buckd.pid, 2 for a bad setting,
    else 1 (the reason on stderr)."""
    interval, idle = buck.daemon_settings()
    why, by = started_because()
    buck.trace["role"] = "daemon"
    buck.make_private_dirs(d)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a Ctrl-C meant for our client must not
    read_end, write_end = os.pipe()                 # stop the buckd it starts
    child = os.fork()
    if child:                       # `buck daemon`: wait for buckd's word
        os.close(write_end)
        os.waitpid(child, 0)        # the intermediate process exits at once
        with os.fdopen(read_end, "rb") as pipe:
            word = pipe.read().decode(errors="replace")   # "CODE message", or "" if buckd died
        code, _, message = word.partition(" ") if word else (
            buck.EXIT_FAILED, "", f"{DAEMON} exited during startup, see {os.path.join(d, STDERR_FILE)}")
        buck.to_stderr(f"{message}\n".encode() if message else b"")
        return int(code)
    os.close(read_end)
    daemonize(root)
    try:
        code = run(d, root, interval, idle, why, by, ready=write_end)
    except BaseException as e:
        panic(e)
    os._exit(code)


def started_because():
    """Why this buckd is started, and by whom: what the client put in STARTED_ENV (not in argv:
    every user can read that in `ps`), removed so that the commands we run do not inherit it."""
    try:
        told = json.loads(os.environ.pop(buck.STARTED_ENV))
        return str(told["why"]), str(told["by"])
    except (KeyError, ValueError, TypeError, RecursionError):
        return f"started by hand (`{TOOL} daemon`)", f"pid {os.getppid()}"


def daemonize(root):
    """The classic recipe (Stevens, APUE 13.3; PEP 3143), each step for a reason. (fds 0-2
    are valid already: buck.standard_fds.)"""
    os.setsid()                     # a session of our own: no terminal, no client's signals
    if os.fork():
        os._exit(0)                 # not a session leader: can never acquire a terminal
    os.chdir("/")                   # keep no directory busy
    os.umask(0o077)                 # every file we create is private
    name_process(f"{DAEMON}[{os.path.basename(root)}]")     # findable in `ps` and `top`


def name_process(name):
    """Our name in `ps` and `top`: on Linux the 15-byte comm, inherited by the threads we start
    later. Elsewhere the stdlib cannot, and we stay `python`."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(15, os.fsencode(name)[:15], 0, 0, 0)     # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def run(d, root, interval, idle, why, by, ready):
    """buckd from start to exit, as "daemon process flow" tells it. Startup errors are told
    to `buck daemon`; anything else unexpected is a panic."""
    wake = watch_signals()
    try:
        pid_fd = lock_pid_file(d)           # "write its pid to a locked file buckd.pid"
    except AlreadyRunning as e:
        return tell(ready, buck.EXIT_ALREADY_RUNNING, str(e))
    except OSError as e:
        return tell(ready, buck.EXIT_FAILED, f"{DAEMON} cannot lock {buck.shown(e.filename)}: {e.strerror}")
    step("daemon.locked")
    ours.update(dir=d, pid_fd=pid_fd)
    try:
        redirect_stdio(d)                   # "It redirects its stdout and stderr to files"
        previous = log_start(d, why, by)
        server, api = start_server(d, wake[1], why, by, previous)   # "starts up the grpc DaemonApi"
        info_id = write_info(d, api)        # "write the port it is running on ... to buckd.info"
    except OSError as e:                    # e.g. a daemon dir we may not write in
        log(f"cannot start: {e}")
        step("daemon.shutdown", reason=str(e), path="startup")
        step("daemon.exit")
        return tell(ready, buck.EXIT_FAILED, f"{DAEMON} cannot start: {buck.shown(e.filename)}: {e.strerror}")
    step("daemon.serving", port=api.port)
    log(f"serving on 127.0.0.1:{api.port}")
    tell(ready, 0, "")                      # "Once that is done, the server is ready"
    how, reason = serve(api, d, root, pid_fd, info_id, wake[0], interval, idle)
    api.shutdown(reason)
    step("daemon.shutdown", reason=reason, path=how)
    log(f"shutting down ({how}): {reason}")
    record_end(how, reason)
    server.stop(GRACE).wait()               # running commands get to say why they end
    if still_ours(d, pid_fd, INFO_FILE, info_id):
        os.unlink(os.path.join(d, INFO_FILE))
    step("daemon.exit")
    return 0


def watch_signals():
    """SIGTERM and SIGINT ask buckd to shut down: Python's C handler writes the signal's number
    to a pipe that serve() waits on, as does the Kill call; the Python handlers do nothing (one
    runs in the main thread, maybe while it holds a lock). Returns (read end, write end)."""
    wake = os.pipe()
    for fd in wake:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake[1])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    return wake


class AlreadyRunning(Exception):
    """Another buckd holds buckd.pid: "only a single daemon is allowed at a time"."""


# "write its pid to a locked file "buckd.pid" ... locked exclusively by the daemon process
# until it exits"
def lock_pid_file(d):
    """Lock buckd.pid, then write our pid in it (truncate only once locked). A POSIX record lock,
    so that clients can ask the kernel who holds it (buck.holder); it is dropped when its holder
    closes *any* fd of the file, so buckd never opens buckd.pid again (buck.open_file refuses)."""
    fd = buck.open_file(os.path.join(d, PID_FILE), os.O_RDWR | os.O_CREAT)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file", os.path.join(d, PID_FILE))
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        pid = buck.lock_holder(fd)
        os.close(fd)                # we hold no lock on it: closing it drops nothing
        raise AlreadyRunning(f"{DAEMON} is already running for {buck.shown(d)} (pid {pid})") from None
    except OSError:
        os.close(fd)
        raise
    buck.own_pid_file = os.fstat(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def redirect_stdio(d):
    """"It redirects its stdout and stderr to files in the daemon directory"; the previous
    buckd's files move to prev/, where a report of how it ended can find them."""
    buck.keep_logs(d)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, os.path.join(d, STDOUT_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, os.path.join(d, STDERR_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = buck.open_file(path, flags)
        os.dup2(opened, fd)
        os.close(opened)


def log_start(d, why, by):
    """Say in our log and in END_FILE that we run, and why; return how the buckd before us
    ended. (The log's first line names our pid: crash reports find it by that.)"""
    previous = buck.how_it_ended(d) or "none known"
    log(f"{DAEMON} pid {os.getpid()} version {buck.version()} starting in {d}")
    log(f"started because: {why} (by {by})")
    log(f"the previous {DAEMON}: {previous}")
    buck.write_atomically(os.path.join(d, buck.END_FILE), json.dumps({"pid": os.getpid()}).encode())
    return previous


def tell(ready, code, message):
    """Give `buck daemon` its exit code and message; return the code. If it is gone (its
    client was interrupted), buckd carries on: the next client will use it."""
    try:
        os.write(ready, f"{code} {message}".encode(errors="backslashreplace"))
    except OSError:
        pass
    os.close(ready)
    return code


def write_info(d, api):
    """Write buckd.info at once (never seen half-written); mark our environment with this
    buckd's instance, for the commands we run; return the file's identity (file_id)."""
    info = {"pid": os.getpid(), "port": api.port, "version": api.version,
            "auth_token": api.token, "start_time": api.start_time}
    buck.write_atomically(os.path.join(d, INFO_FILE), json.dumps(info).encode())
    os.environ[buck.INSTANCE_ENV] = buck.instance(info)
    return file_id(os.path.join(d, INFO_FILE))


def file_id(path):
    """What tells a file, and a rewrite of it, apart without opening it (an open and close of
    a link to buckd.pid would drop our lock; a FIFO would hang)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def still_ours(d, pid_fd, name, name_id):
    """Are buckd.pid the file we hold and `name` the file we wrote (or, for None, ours to write)?
    Never touch the files of a newer buckd: ours may have been replaced."""
    try:
        same_pid_file = os.path.samestat(os.stat(os.path.join(d, PID_FILE)), os.fstat(pid_fd))
        return same_pid_file and (name is None or file_id(os.path.join(d, name)) == name_id)
    except OSError:
        return False


def record_end(how, reason):
    """Write how we end in END_FILE, if it is still ours to write (a dir deleted, or a newer
    buckd's: nothing)."""
    if ours and still_ours(ours["dir"], ours["pid_fd"], None, None):
        try:
            buck.record_end(ours["dir"], os.getpid(), how, reason)
        except OSError:
            pass


def log(message):
    print(time.strftime("%Y-%m-%d %H:%M:%S"), message, file=sys.stderr, flush=True)


# "There are 3 ways that the buckd process will shutdown", and a signal, idleness, and a
# repository that is gone.
def serve(api, d, root, pid_fd, info_id, wake, interval, idle):
    """Wait until buckd must shut down; return how and why. (3, a panic, exits from wherever
    it happens.)"""
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
            if reason := check_repository(root):
                return "repository gone", reason
            next_check = now + interval
        if idle and not api.active and now >= api.last_used + idle:
            return "idle", f"no client for {idle:g} s ({buck.IDLE_TIMEOUT_ENV})"


# Shutdown path 2: "buckd will periodically (every 100s or so) check the "buckd.pid" and
# "buckd.info" files to ensure that they still match that buckd process."
def check_files_still_ours(d, pid_fd, info_id):
    """Why buckd must exit now, or None while both files still name this process. (It opens
    neither: buckd.pid is read through our fd, buckd.info compared by file_id.)"""
    try:
        ours_now, there = os.fstat(pid_fd), os.stat(os.path.join(d, PID_FILE))
    except OSError:
        return f"{PID_FILE} was removed"
    if not os.path.samestat(ours_now, there):
        return f"{PID_FILE} was replaced"
    if os.pread(pid_fd, 64, 0) != f"{os.getpid()}\n".encode():
        return f"{PID_FILE} names another process"
    try:
        if file_id(os.path.join(d, INFO_FILE)) == info_id:
            return None
    except OSError:
        pass
    return f"{INFO_FILE} was removed or rewritten"


def check_repository(root):
    """Why buckd must exit now that its repository is gone (as buck2 does), or None."""
    if not os.path.isfile(os.path.join(root, buck.MARKER)):
        return f"the repository {buck.shown(root)} or its {buck.MARKER} is gone"
    return None


# Shutdown path 3: "If buckd hits a rust `panic()` the buckd process will exit"
def panic(error):
    """A bug in buckd, wherever it happens: its traceback goes to buckd.stderr and buckd exits at
    once (a daemon in an unknown state must not serve)."""
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


def start_server(d, wake, why, by, previous):
    """The DaemonApi gRPC server on 127.0.0.1, port chosen by the kernel: a thread for each
    running command (MAX_COMMANDS at most), and spares, so that Status and Kill never queue."""
    global grpc, pb, workload
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    grpc, pb, pb_grpc = buck.load_grpc()
    workload = __import__(buck.WORKLOAD)
    api = DaemonApi(d, wake, why, by, previous)
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
            given = dict(details.invocation_metadata).get(buck.TOKEN_KEY, "")
            return continuation(details) if hmac.compare_digest(given.encode(), token.encode()) else deny
    return RequireToken()


class DaemonApi:
    """The servicer: Status, Kill, and Command, which runs a workload command. `lock` guards
    `active` and `reason`, and is never taken in a signal handler; reads of a counter or of
    `last_used` take none."""

    def __init__(self, d, wake, why, by, previous):
        self.dir, self.version, self.wake, self.port = d, buck.version(), wake, 0
        self.why, self.by, self.previous = map(buck.shown, (why, by, previous))     # valid UTF-8
        self.token = os.urandom(16).hex()
        self.start_time, self.last_used = time.time(), time.monotonic()  # last: for idleness
        self.lock = threading.Lock()
        self.active = set()         # an Event per running command, set to stop it
        self.reason = None          # why buckd is shutting down

    @panics
    def Status(self, request, context):
        idle, self.last_used = 0 if self.active else time.monotonic() - self.last_used, time.monotonic()
        return pb.StatusResponse(
            pid=os.getpid(), port=self.port, version=self.version,
            daemon_dir=self.dir.encode(errors="surrogateescape").decode(errors="replace"),
            start_time=self.start_time, uptime_s=time.time() - self.start_time,
            active_commands=len(self.active), idle_s=idle, started_because=self.why,
            started_by=self.by, previous_end=self.previous, figures=workload.status())

    # Shutdown path 1: "The grpc api includes a `kill()` call that will shutdown buckd."
    @panics
    def Kill(self, request, context):
        self.shutdown(request.reason or "killed by a client")
        return pb.KillResponse()

    def shutdown(self, reason):
        """Begin the exit (once): stop every running command, each telling its client why,
        and wake the main thread (serve)."""
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
        """One command, by daemon.proto's handshake. A malformed request ends its own call
        (INVALID_ARGUMENT), as does one past MAX_COMMANDS (RESOURCE_EXHAUSTED): only a bug
        of buckd's own is a panic."""
        stop = threading.Event()
        with self.lock:             # counted from the start: a stream holds a thread
            refused = self.reason or len(self.active) >= MAX_COMMANDS
            if not refused:
                self.active.add(stop)
                self.last_used = time.monotonic()
        if refused:                 # not accepted: the client may send it elsewhere
            context.abort(*((grpc.StatusCode.UNAVAILABLE, f"{DAEMON} is shutting down") if self.reason else
                            (grpc.StatusCode.RESOURCE_EXHAUSTED, f"{DAEMON} is busy: {MAX_COMMANDS} commands are running")))
        if not context.add_callback(stop.set):      # the call ends: the client went away
            stop.set()
        try:
            request = next(requests, None)
            problem = malformed(request)
            if problem:
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
    if request.name not in workload.COMMANDS:
        return f"no command {buck.shown(request.name)}"
    if not os.path.isabs(request.cwd):
        return f"cwd must be an absolute path, not {buck.shown(request.cwd)}"
    if any(b"\0" in arg for arg in [request.cwd, *request.args]):
        return "a path with a NUL byte"
    return None


def run_workload(request, stop):
    """Run a workload command (workload.py says what `call` holds): its events as CommandEvents,
    then its exit code. Bad arguments are said as the client says its own."""
    call = SimpleNamespace(args=list(request.args), options=dict(request.options), cwd=request.cwd,
                           stop=stop, open=buck.open_file)
    try:
        buck.check_usage(request.name, call.args, call.options)
        events = workload.COMMANDS[request.name][2](call)
        while True:
            try:
                kind, data = next(events)
            except StopIteration as end:
                return end.value
            yield pb.CommandEvent(**{kind: data})
    except buck.Fail as e:
        message = buck.usage_error(request.name, e) if e.code == buck.EXIT_USAGE else e
        yield pb.CommandEvent(stderr=f"{TOOL}: {message}\n".encode(errors="backslashreplace"))
        return e.code
