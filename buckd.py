"""buckd: the buck daemon ("daemon process flow" in buck2's daemon_lifecycle.md).

`buck daemon` calls main(): it daemonizes, locks buckd.pid, serves the DaemonApi on
loopback and writes buckd.info; only then does `buck daemon` exit 0. buckd serves until one
of the doc's three ways to shut down (the Kill call; its files no longer naming it; a panic,
a bug of its own), or a signal (SIGTERM, SIGINT), or BUCKD_IDLE_TIMEOUT without a client.

Commands run here, each a generator in HANDLERS named as in buck.COMMANDS: it gets the
request (operands as bytes, options, the client's cwd) and an Event set when it must stop;
it yields output events and returns its exit code, or None if it was stopped.
"""
import fcntl
import hashlib
import hmac
import json
import os
import select
import signal
import stat
import struct
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import buck
from buck import DAEMON, INFO_FILE, PID_FILE, STDERR_FILE, STDOUT_FILE, TOOL, step

CHECK_INTERVAL = 100.0      # "every 100s or so" (BUCKD_CHECK_INTERVAL)
IDLE_TIMEOUT = 3 * 3600.0   # as Bazel's --max_idle_secs (BUCKD_IDLE_TIMEOUT; 0: never)
MAX_SECONDS = 1e7           # the longest interval or timeout we accept (115 days)
GRACE = 2.0                 # seconds running commands get, at shutdown, to say why they end
MAX_COMMANDS = 256          # commands running at once; one more is refused: buckd is busy
SPARE_THREADS = 16          # server threads beyond those: Status and Kill never queue
RACY_NS = 20_000_000        # a file changed this close to its hashing may change unseen...
COARSE_RACY_NS = 2_000_000_000  # ...or this close, where timestamps are whole seconds
CACHE_LIMIT = 1_000_000     # digests kept; past that the cache starts afresh
READ_SIZE = 1 << 20         # bytes per read when hashing
CHUNK = 64 * 1024           # bytes of output per stream message
STAMP = struct.Struct("qqq")    # size, mtime_ns, ctime_ns: while unchanged, so is the digest
grpc = pb = None            # imported after daemonizing: grpc must not cross a fork


def main(d, foreground=False):
    """`buck daemon`: start buckd for daemon dir `d`. Returns `buck daemon`'s exit code: 0
    once buckd serves, 3 if another buckd holds buckd.pid, 2 for a bad setting, else 1 (the
    reason on stderr). In the foreground, buckd runs here until it shuts down."""
    interval = seconds(buck.CHECK_INTERVAL_ENV, CHECK_INTERVAL)
    idle = seconds(buck.IDLE_TIMEOUT_ENV, IDLE_TIMEOUT, zero_means_never=True)
    buck.trace["role"] = "daemon"
    os.makedirs(d, 0o700, exist_ok=True)
    if foreground:
        return run(d, interval, idle, ready=None)
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
        print(message, file=sys.stderr, end="\n" if message else "")
        return int(code)
    os.close(read_end)
    daemonize()
    os._exit(run(d, interval, idle, ready=write_end))


def seconds(name, default, zero_means_never=False):
    """A duration from the environment: a bad one is an error, not a busy loop or overflow."""
    text = os.environ.get(name)
    try:
        value = default if text is None else float(text)
    except ValueError:
        value = -1
    if zero_means_never and value == 0:
        return None
    if not 0.01 <= value <= MAX_SECONDS:
        raise buck.Fail(f"{name} must be seconds from 0.01 to {MAX_SECONDS:g}"
                        f"{' (0: never)' * zero_means_never}, not {text!r}", buck.EXIT_USAGE)
    return value


def daemonize():
    """The classic recipe (Stevens, APUE 13.3; PEP 3143), each step for a reason."""
    os.setsid()                     # a session of our own: no terminal, no client's signals
    if os.fork():
        os._exit(0)                 # not a session leader: can never acquire a terminal
    os.chdir("/")                   # keep no directory busy
    os.umask(0o077)                 # every file we create is private


def run(d, interval, idle, ready):
    """buckd from start to exit: startup, serving until a way to shut down, shutdown."""
    wake = watch_signals()
    try:
        pid_fd = lock_pid_file(d)
    except AlreadyRunning as e:
        return tell(ready, buck.EXIT_ALREADY_RUNNING, str(e))
    except OSError as e:
        return tell(ready, buck.EXIT_FAILED, f"{DAEMON} cannot lock {e.filename}: {e.strerror}")
    step("daemon.locked")
    try:
        if ready is not None:
            redirect_stdio(d)
        log(f"{DAEMON} pid {os.getpid()} version {buck.version()} starting in {d}")
        threading.excepthook = lambda hook: panic(hook.exc_value)
        server, api = start_server(d, wake[1], pid_fd)
        info = json.dumps({"pid": os.getpid(), "port": api.port, "version": api.version,
                           "auth_token": api.token, "start_time": api.start_time}).encode()
        info_id = write_atomically(os.path.join(d, INFO_FILE), info)
    except OSError as e:            # e.g. a daemon dir we may not write in
        log(f"cannot start: {e}")
        step("daemon.shutdown", reason=str(e), path="startup")
        step("daemon.exit")
        return tell(ready, buck.EXIT_FAILED, f"{DAEMON} cannot start: {e.filename}: {e.strerror}")
    except BaseException as e:
        panic(e)
    step("daemon.serving", port=api.port)
    log(f"serving on 127.0.0.1:{api.port}")
    tell(ready, 0, "")
    reason, path = serve(api, d, pid_fd, info_id, wake[0], interval, idle)
    api.shutdown(reason)
    step("daemon.shutdown", reason=reason, path=path)
    log(f"shutting down ({path}): {reason}")
    server.stop(GRACE).wait()       # running commands get to say why they end
    remove_info_if_ours(d, pid_fd, info_id)
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
    closes *any* fd of the file, so buckd never opens buckd.pid again: it reads this fd."""
    fd = os.open(os.path.join(d, PID_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        pid = buck.lock_holder(fd)
        os.close(fd)                # we hold no lock on it: closing it drops nothing
        raise AlreadyRunning(f"{DAEMON} is already running for {d} (pid {pid})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def redirect_stdio(d):
    """"It redirects its stdout and stderr to files in the daemon directory"; the previous
    buckd's move to prev/, where a report of how it ended can find them."""
    buck.keep_logs(d)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, os.path.join(d, STDOUT_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, os.path.join(d, STDERR_FILE), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)


def tell(ready, code, message):
    """Give `buck daemon` its exit code and message; return the code. If it is gone (its
    client was interrupted), buckd carries on: the next client will use it."""
    if ready is None:               # in the foreground: to our own stderr
        log(message or "serving")
        return code
    try:
        os.write(ready, f"{code} {message}".encode())
    except OSError:
        pass
    os.close(ready)
    return code


def write_atomically(path, data):
    """Write a whole file under its final name at once; return its file_id."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return file_id(path)


def file_id(path):
    """What tells a file, and a rewrite of it, apart without opening it (an open and close of
    a link to buckd.pid would drop our lock; a FIFO would hang)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remove_info_if_ours(d, pid_fd, info_id):
    """Remove buckd.info if it is the one we wrote and buckd.pid the one we hold: never the
    files of a newer buckd (ours may have been replaced)."""
    try:
        if (os.path.samestat(os.stat(os.path.join(d, PID_FILE)), os.fstat(pid_fd))
                and file_id(os.path.join(d, INFO_FILE)) == info_id):
            os.unlink(os.path.join(d, INFO_FILE))
    except OSError:
        pass


def log(message):
    print(time.strftime("%Y-%m-%d %H:%M:%S"), message, file=sys.stderr, flush=True)


def panic(error):
    """Shutdown path 3, the doc's rust `panic()`: a bug in buckd. Its traceback goes to
    buckd.stderr and buckd exits at once: a daemon in an unknown state must not serve."""
    traceback.print_exception(error)
    step("daemon.shutdown", reason=f"panic: {error!r}", path="panic")
    step("daemon.exit")
    sys.stderr.flush()
    os._exit(buck.EXIT_PANIC)


# "There are 3 ways that the buckd process will shutdown"
def serve(api, d, pid_fd, info_id, wake, interval, idle):
    """Wait until buckd must shut down; return why, and which way: "kill" (1), "self-check"
    (2), "signal" or "idle". (3, a panic, exits from wherever it happens.)"""
    next_check = time.monotonic() + interval
    while True:
        idle_at = (time.monotonic() if api.active else api.last_used) + idle if idle else float("inf")
        if select.select([wake], [], [], max(0, min(next_check, idle_at) - time.monotonic()))[0]:
            signals = [s for s in os.read(wake, 512) if s]     # 0 is the Kill call's byte
            if api.reason:
                return api.reason, "kill"
            if signals:
                return f"{DAEMON} received {signal.Signals(signals[0]).name}", "signal"
        now = time.monotonic()
        if now >= next_check:
            reason = check_files_still_ours(d, pid_fd, info_id)
            if reason:
                return reason, "self-check"
            next_check = now + interval
        if idle and not api.active and now >= api.last_used + idle:
            return f"no client for {idle:g} s ({buck.IDLE_TIMEOUT_ENV})", "idle"


# Shutdown path 2: "buckd will periodically (every 100s or so) check the "buckd.pid" and
# "buckd.info" files to ensure that they still match that buckd process."
def check_files_still_ours(d, pid_fd, info_id):
    """Why buckd must exit now, or None while both files still name this process. (It opens
    neither: buckd.pid is read through our fd, buckd.info compared by file_id.)"""
    try:
        ours, there = os.fstat(pid_fd), os.stat(os.path.join(d, PID_FILE))
    except OSError:
        return f"{PID_FILE} was removed"
    if not os.path.samestat(ours, there):
        return f"{PID_FILE} was replaced"
    if os.pread(pid_fd, 64, 0) != f"{os.getpid()}\n".encode():
        return f"{PID_FILE} names another process"
    try:
        if file_id(os.path.join(d, INFO_FILE)) == info_id:
            return None
    except OSError:
        pass
    return f"{INFO_FILE} was removed or rewritten"


def start_server(d, wake, pid_fd):
    """The DaemonApi gRPC server on 127.0.0.1, port chosen by the kernel: a thread for each
    running command (MAX_COMMANDS at most), and spares, so that Status and Kill never queue."""
    global grpc, pb
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    grpc, pb, pb_grpc = buck.load_grpc()
    api = DaemonApi(d, buck.version(), wake, pid_fd)
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


class Invalid(Exception):
    """A command's arguments are wrong: its client gets the message, and exit code 2."""


class DaemonApi:
    """The servicer (Status, Kill, Command) and what commands share: the digest cache. `lock`
    guards `active`, `reason` and writes to the cache, and is never taken in a signal handler;
    reads of a counter or of `last_used`, and cache lookups, take none."""

    def __init__(self, d, version, wake, pid_fd):
        self.dir, self.version, self.wake, self.port = d, version, wake, 0
        self.pid_fd, self.pid_stat = pid_fd, os.fstat(pid_fd)
        self.token = os.urandom(16).hex()
        self.start_time, self.last_used = time.time(), time.monotonic()  # last: for idleness
        self.lock = threading.Lock()
        self.active = set()         # an Event per running command, set to stop it
        self.reason = None          # why buckd is shutting down
        self.digests = {}           # dev << 64 | ino -> STAMP + hex digest
        self.files_read = 0

    def Status(self, request, context):
        self.last_used = time.monotonic()
        return pb.StatusResponse(
            pid=os.getpid(), port=self.port, version=self.version,
            daemon_dir=self.dir.encode(errors="surrogateescape").decode(errors="replace"),
            start_time=self.start_time, uptime_s=time.time() - self.start_time,
            active_commands=len(self.active), cache_entries=len(self.digests),
            files_read=self.files_read)

    # Shutdown path 1: "The grpc api includes a `kill()` call that will shutdown buckd."
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
            try:
                code = yield from HANDLERS[request.name](self, request, stop)
            except Invalid as e:
                yield pb.CommandEvent(stderr=f"{TOOL} {request.name}: {e}\n".encode())
                code = buck.EXIT_USAGE
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

    def digest(self, path, st, stop):
        """A file's hex digest: cached while its size and times are unchanged, else read and
        cached under what the open file says of itself, unless "racy" (changed so recently that
        a change right after our read could keep its size and times). None if stopped midway;
        an OSError if it cannot be read. Never buckd.pid through a new fd (see lock_pid_file)."""
        key, stamp = st.st_dev << 64 | st.st_ino, STAMP.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        entry = self.digests.get(key)
        if entry and entry.startswith(stamp):
            return entry[STAMP.size:]
        if os.path.samestat(st, self.pid_stat):         # ours: read it through our own fd
            return hashlib.sha256(os.pread(self.pid_fd, 1 << 16, 0)).hexdigest().encode()
        started, sha, size = time.time_ns(), hashlib.sha256(), 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)   # never hang on a FIFO
            st = os.fstat(fd)       # the file we read, wherever the path leads now
            if os.path.samestat(st, self.pid_stat):     # closing it would drop our lock:
                return OSError(0, f"{DAEMON}'s own {PID_FILE}")  # keep the fd, never close it
            try:
                while stat.S_ISREG(st.st_mode) and (chunk := os.read(fd, READ_SIZE)):
                    if stop.is_set():
                        return None
                    sha.update(chunk)
                    size += len(chunk)
            finally:
                os.close(fd)
        except OSError as e:
            return e
        if not stat.S_ISREG(st.st_mode):
            return OSError(0, "Not a regular file")
        key, stamp = st.st_dev << 64 | st.st_ino, STAMP.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        digest, newest = sha.hexdigest().encode(), max(st.st_mtime_ns, st.st_ctime_ns)
        racy = COARSE_RACY_NS if newest % 1_000_000_000 == 0 else RACY_NS
        with self.lock:
            self.files_read += 1
            if newest < started - racy and size == st.st_size:  # (/proc files lie about size)
                if len(self.digests) >= CACHE_LIMIT:
                    self.digests = {}
                self.digests[key] = stamp + digest
        return digest


def malformed(request):
    """What is wrong with a Command request that no handler should see, or None."""
    if request is None:
        return "no command was sent"
    if request.name not in HANDLERS:
        return f"no command {request.name!r}"
    if not os.path.isabs(request.cwd):
        return f"cwd must be an absolute path, not {request.cwd!r}"
    if any(b"\0" in arg for arg in [request.cwd, *request.args]):
        return "a path with a NUL byte"
    return None


def expect(request, least, most, options=()):
    """Check a command's operand count and options, or raise Invalid."""
    if not least <= len(request.args) <= most:
        raise Invalid(f"{'missing' if len(request.args) < least else 'extra'} operand(s)")
    unknown = set(request.options) - set(options)
    if unknown:
        raise Invalid(f"unknown option(s): {', '.join(sorted(unknown))}")


# --- Commands

def cmd_hash(api, request, stop):
    """`buck hash PATH...`: what sha256sum prints for these paths, a directory standing for
    the regular files below it, sorted; errors in their place on stderr."""
    expect(request, 1, float("inf"))
    code, out = 0, bytearray()
    for shown, digest in hash_jobs(api, request, stop):
        if stop.is_set():
            return None
        if isinstance(digest, OSError):
            code = 1
            if out:                 # stdout before stderr, in the order of the paths
                yield pb.CommandEvent(stdout=bytes(out))
                out.clear()
            yield pb.CommandEvent(stderr=b"%s hash: %s: %s\n" % (TOOL.encode(), shown, digest.strerror.encode()))
            continue
        out += sha256sum_line(digest, shown)
        if len(out) >= CHUNK:
            yield pb.CommandEvent(stdout=bytes(out))
            out.clear()
    if out:
        yield pb.CommandEvent(stdout=bytes(out))
    return code


def hash_jobs(api, request, stop):
    """(path as shown, hex digest or OSError) for each file, in output order."""
    for arg in request.args:
        path = os.path.join(request.cwd, arg)   # the client's cwd, not ours ("/")
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                shown, path = os.path.join(arg, b""), os.path.join(path, b"")   # both end in "/"
                for rel, st in files_below(path):
                    yield shown + rel, st if isinstance(st, OSError) else api.digest(path + rel, st, stop)
            else:
                yield arg, api.digest(path, st, stop) if stat.S_ISREG(st.st_mode) else OSError(0, "Not a regular file")
        except OSError as e:
            yield arg, e


def files_below(top):
    """(path relative to top, stat or OSError) of each regular file below top (which ends in
    "/"), in the order of their sorted paths: a directory at a time, in which a subdirectory
    sorts as its name and "/", as every path below it begins so."""
    stack = [sorted_entries(top)]
    while stack:
        for entry in stack[-1]:
            if entry.is_dir(follow_symlinks=False):
                try:
                    stack.append(sorted_entries(entry.path + b"/"))
                    break
                except OSError as e:
                    yield entry.path[len(top):] + b"/", e
            elif entry.is_file(follow_symlinks=False):
                try:
                    yield entry.path[len(top):], entry.stat(follow_symlinks=False)
                except OSError as e:            # e.g. removed since we listed it
                    yield entry.path[len(top):], e
        else:
            stack.pop()


def sorted_entries(path):
    with os.scandir(path) as entries:
        return iter(sorted(entries, key=lambda e: e.name + b"/" if e.is_dir(follow_symlinks=False) else e.name))


def sha256sum_line(digest, name):
    """One line as sha256sum prints it: a name with \\, \\n or \\r is escaped, the line
    marked by a leading backslash."""
    if b"\\" in name or b"\n" in name or b"\r" in name:
        name = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\%s  %s\n" % (digest, name)
    return b"%s  %s\n" % (digest, name)


def cmd_debug_sleep(api, request, stop):
    """`buck debug sleep SECONDS`: one line, then a sleep that ends early if stopped."""
    expect(request, 1, 1)
    text = request.args[0].decode(errors="replace")
    seconds = float(text) if text.replace(".", "", 1).isdigit() else -1
    if not 0 <= seconds <= MAX_SECONDS:
        raise Invalid(f"SECONDS must be a number from 0 to {MAX_SECONDS:g}, not {text!r}")
    done = time.monotonic() + seconds
    yield pb.CommandEvent(stdout=b"sleeping for %g s\n" % seconds)
    stop.wait(done - time.monotonic())
    return 0 if time.monotonic() >= done else None


def cmd_debug_crash(api, request, stop):
    """`buck debug crash`: a simulated bug in a command, hence a panic."""
    expect(request, 0, 0)
    raise RuntimeError("`buck debug crash` was invoked")
    yield                           # (a generator, like every command)


HANDLERS = {"hash": cmd_hash, "debug sleep": cmd_debug_sleep, "debug crash": cmd_debug_crash}
