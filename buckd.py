"""buckd: the buck daemon. The spec is ../shared/design/buckd.md, "daemon process flow".

`buck daemon` calls main(): it daemonizes, locks buckd.pid, serves the DaemonApi on
loopback and writes buckd.info, and only then does the `buck daemon` process exit 0.
buckd runs until one of the doc's three shutdown paths: the Kill call, its files no longer
naming it (checked every BUCKD_CHECK_INTERVAL seconds), or a panic (any unexpected error).

Commands run here. Each is a generator in HANDLERS: it gets the arguments (bytes), the
client's cwd and an Event set when the command must stop; it yields output events and
returns the exit code. Adding a command = one function here + its argparse entry in buck.py.
"""
import fcntl
import hashlib
import hmac
import json
import os
import signal
import stat
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

RACY_NS = 2_000_000_000  # a file changed this close to its hashing may change again unseen
WINDOW = 256             # files being hashed ahead of the one `buck hash` prints next
BIG_FILE = 1 << 20       # files this big are hashed in the thread pool
CHUNK = 64 * 1024        # bytes of output per stream message
grpc = pb = None         # imported after daemonizing: grpc must not cross a fork


def main(d, version, foreground=False):
    """`buck daemon`: start buckd for daemon dir `d`. Returns the `buck daemon` exit code:
    0 once buckd serves; 3 if another buckd holds buckd.pid; else 1. Why: on stderr."""
    try:
        interval = float(os.environ.get("BUCKD_CHECK_INTERVAL", 100))
    except ValueError:
        print("buck daemon: BUCKD_CHECK_INTERVAL must be a number of seconds", file=sys.stderr)
        return 2
    os.makedirs(d, 0o700, exist_ok=True)
    if foreground:
        run(d, version, interval, ready=None)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:                       # the `buck daemon` process: wait for buckd's word
        os.close(write_end)
        os.waitpid(child, 0)        # the intermediate process exits at once
        with os.fdopen(read_end, "rb") as pipe:
            word = pipe.read().decode(errors="replace")   # "CODE message", or "" if buckd died
        code, _, message = word.partition(" ")
        if not word:
            code, message = 1, f"buckd exited during startup, see {d}/buckd.stderr"
        if message:
            print(message, file=sys.stderr)
        return int(code)
    os.close(read_end)
    daemonize()
    run(d, version, interval, ready=write_end)


def daemonize():
    """The classic recipe (Stevens, APUE 13.3; PEP 3143), each step for a reason."""
    os.setsid()                     # a session of our own: no terminal, no client's signals
    if os.fork():
        os._exit(0)                 # not a session leader: can never acquire a terminal
    os.chdir("/")                   # keep no directory busy
    os.umask(0o077)                 # every file we create is private


def run(d, version, interval, ready):
    """buckd itself: lock buckd.pid, redirect stdio, serve, write buckd.info, wait."""
    try:
        pid_fd = lock_pid_file(d)
        if ready is not None:
            redirect_stdio(d)
        threading.excepthook = lambda hook: panic(hook.exc_value)
        server, api = start_server(d, version)
        info = json.dumps({"pid": os.getpid(), "port": api.port, "version": version,
                           "auth_token": api.token, "start_time": api.start_time}).encode()
        write_atomically(os.path.join(d, "buckd.info"), info)
        log(f"buckd {version} serving on 127.0.0.1:{api.port}")
    except AlreadyRunning as e:
        tell(ready, 3, str(e))
        os._exit(3)
    except BaseException as e:
        panic(e)
    tell(ready, 0, "")
    signal.signal(signal.SIGTERM, lambda *_: api.shutdown("buckd received SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: api.shutdown("buckd received SIGINT"))
    while not api.stopping.wait(interval):
        reason = check_files_still_ours(d, pid_fd, info)
        if reason:
            api.shutdown(reason)
    log(f"shutting down: {api.reason}")
    server.stop(grace=2).wait()     # running commands get to say why they end
    if read_file(os.path.join(d, "buckd.info")) == info:
        os.unlink(os.path.join(d, "buckd.info"))
    os._exit(0)


class AlreadyRunning(Exception):
    """Another buckd holds buckd.pid: "only a single daemon is allowed at a time"."""


def lock_pid_file(d):
    """Write our pid to buckd.pid, locked exclusively until we exit. Open without truncating,
    lock, then truncate: never clobber the pid of the daemon that holds the lock."""
    fd = os.open(os.path.join(d, "buckd.pid"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        raise AlreadyRunning(f"buckd is already running for {d} (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def redirect_stdio(d):
    """stdin from /dev/null; stdout and stderr to buckd.stdout and buckd.stderr."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, os.path.join(d, "buckd.stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, os.path.join(d, "buckd.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)


def tell(ready, code, message):
    """Give the waiting `buck daemon` process its exit code and message: 0 when buckd
    serves, 3 when another buckd holds buckd.pid. (The pipe's EOF ends its wait.)"""
    if ready is None:
        print(message or "buckd is serving", file=sys.stderr)
    else:
        os.write(ready, f"{code} {message}".encode())
        os.close(ready)


def write_atomically(path, data):
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def log(message):
    print(time.strftime("%Y-%m-%d %H:%M:%S"), message, file=sys.stderr, flush=True)


def panic(error):
    """Shutdown path 3, the doc's rust panic(): traceback to buckd.stderr, exit at once.
    A daemon in an unknown state must not keep serving."""
    traceback.print_exception(type(error), error, error.__traceback__)
    sys.stderr.flush()
    os._exit(101)


# Shutdown path 2: "buckd will periodically (every 100s or so) check the "buckd.pid" and
# "buckd.info" files to ensure that they still match that buckd process."
def check_files_still_ours(d, pid_fd, info):
    """Why buckd must exit now, or None while both files still name this process."""
    pid_path = os.path.join(d, "buckd.pid")
    try:
        ours, there = os.fstat(pid_fd), os.stat(pid_path)
    except OSError:
        return "buckd.pid was removed"
    if (ours.st_dev, ours.st_ino) != (there.st_dev, there.st_ino):
        return "buckd.pid was replaced"
    if read_file(pid_path) != f"{os.getpid()}\n".encode():
        return "buckd.pid names another process"
    if read_file(os.path.join(d, "buckd.info")) != info:
        return "buckd.info was removed or rewritten"
    return None


def start_server(d, version):
    """The DaemonApi gRPC server on 127.0.0.1, port chosen by the kernel."""
    global grpc, pb
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import grpc as grpc_module, daemon_pb2, daemon_pb2_grpc
    grpc, pb = grpc_module, daemon_pb2
    api = DaemonApi(d, version)
    server = grpc.server(ThreadPoolExecutor(max_workers=64), interceptors=[require_token(api.token)],
                         options=[("grpc.so_reuseport", 0)])
    daemon_pb2_grpc.add_DaemonApiServicer_to_server(api, server)
    api.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, api


def require_token(token):
    """An interceptor refusing every call that lacks this buckd's token (constant-time)."""
    deny = grpc.unary_unary_rpc_method_handler(
        lambda request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad auth token"))

    class RequireToken(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            given = dict(details.invocation_metadata).get("buckd-token", "")
            ok = hmac.compare_digest(given.encode(), token.encode())
            return continuation(details) if ok else deny
    return RequireToken()


class DaemonApi:
    """The servicer: Status, Kill and Command, and the state commands share (the cache)."""

    def __init__(self, d, version):
        self.dir, self.version, self.port = d, version, 0
        self.token = os.urandom(16).hex()
        self.start_time = time.time()
        self.lock = threading.RLock()   # re-entrant: a signal handler may call shutdown()
        self.active = set()             # one Event per running command, set to stop it
        self.stopping = threading.Event()
        self.reason = None              # why buckd is shutting down
        self.digests = {}               # (dev, ino, size, mtime_ns, ctime_ns) -> hex digest
        self.files_read = 0
        self.pool = ThreadPoolExecutor(os.cpu_count() or 2)

    def Status(self, request, context):
        return pb.StatusResponse(
            pid=os.getpid(), port=self.port, version=self.version, daemon_dir=self.dir,
            start_time=self.start_time, uptime_s=time.time() - self.start_time,
            active_commands=len(self.active), cache_entries=len(self.digests),
            files_read=self.files_read)

    # Shutdown path 1: "The grpc api includes a kill() call that will shutdown buckd."
    def Kill(self, request, context):
        self.shutdown(request.reason or "killed by a client")
        return pb.KillResponse()

    def shutdown(self, reason):
        """Begin the exit: stop every running command; each tells its client why."""
        with self.lock:
            if not self.stopping.is_set():
                self.reason = reason
                for stop in self.active:
                    stop.set()
                self.stopping.set()

    def Command(self, requests, context):
        stop = threading.Event()
        if not context.add_callback(stop.set):      # the call ended: the client went away
            stop.set()
        with self.lock:
            self.active.add(stop)
            if self.reason:
                stop.set()
        try:
            request = next(requests)
            yield pb.CommandEvent(accepted=True)
            if next(requests, None) is None:        # no go-ahead: the client has gone
                return
            handler = HANDLERS.get(request.name)
            if handler is None:
                yield pb.CommandEvent(stderr=f"buckd: no command {request.name!r}\n".encode())
                code = 2
            else:
                code = yield from handler(self, list(request.args), request.cwd, stop)
            yield pb.CommandEvent(shutdown=self.reason) if self.reason else pb.CommandEvent(exit_code=code)
        except grpc.RpcError:
            return                  # the client went away during the handshake
        except Exception as e:
            panic(e)
        finally:
            with self.lock:         # the handler has returned: no longer active
                self.active.discard(stop)

    def digest(self, path, st, stop):
        """A file's hex digest (or the OSError reading it), or a Future of it: the cache
        answers if it can; big files go to the pool, both cores hashing (hashlib releases
        the GIL); small ones are hashed right here, as threads would only fight over the
        GIL for them (measured: two threads took 3x as long as one on the stdlib)."""
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in self.digests:
            return self.digests[key]
        if st.st_size >= BIG_FILE:
            return self.pool.submit(self.read_and_hash, path, key, stop)
        try:
            return self.read_and_hash(path, key, stop)
        except OSError as e:
            return e

    def read_and_hash(self, path, key, stop):
        started = time.time_ns()
        sha = hashlib.sha256()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)   # never hang on a FIFO
        try:
            while chunk := os.read(fd, 1 << 20):
                if stop.is_set():
                    return None     # cancelled: no digest, nothing cached
                sha.update(chunk)
        finally:
            os.close(fd)
        digest = sha.hexdigest().encode()
        with self.lock:
            self.files_read += 1
            if len(self.digests) > 1_000_000:
                self.digests.clear()
            if max(key[3], key[4]) < started - RACY_NS:   # "racy" entries are never trusted
                self.digests[key] = digest
        return digest


# --- Commands

def cmd_hash(api, args, cwd, stop):
    """`buck hash PATH...`: exactly sha256sum's output; a directory stands for the regular
    files below it, sorted. Files are hashed in parallel and printed in order."""
    code, out, window = 0, bytearray(), deque()
    jobs = hash_jobs(api, args, cwd, stop)
    while not stop.is_set():
        while len(window) < WINDOW and (job := next(jobs, None)):
            window.append(job)
        if not window:
            break
        shown, result = window.popleft()
        if isinstance(result, Future):
            if not result.done():
                yield from drain(out)   # show what is ready while we wait
            try:
                result = result.result()
            except OSError as e:
                result = e
        if isinstance(result, OSError):
            code = 1
            yield from drain(out)       # stdout before stderr, in the order of the paths
            yield pb.CommandEvent(stderr=b"buck hash: %s: %s\n" % (shown, result.strerror.encode()))
        elif result is not None:        # None: hashing was cancelled midway
            out += sha256sum_line(result, shown)
            if len(out) >= CHUNK:
                yield from drain(out)
    if not stop.is_set():
        yield from drain(out)
    return 130 if stop.is_set() else code


def drain(out):
    """Send what `out` holds as one stdout event, and empty it."""
    if out:
        yield pb.CommandEvent(stdout=bytes(out))
        out.clear()


def hash_jobs(api, args, cwd, stop):
    """(path as shown, digest | Future | OSError) for each file, in output order."""
    for arg in args:
        path = os.path.join(cwd, arg)   # relative to the client's cwd, not ours ("/")
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                shown, path = os.path.join(arg, b""), os.path.join(path, b"")   # end in "/"
                for rel, st in files_below(path):
                    yield shown + rel, api.digest(path + rel, st, stop)
            elif stat.S_ISREG(st.st_mode):
                yield arg, api.digest(path, st, stop)
            else:
                yield arg, OSError(0, "Not a regular file")
        except OSError as e:
            yield arg, e


def files_below(top):
    """(path relative to top, stat) of each regular file below top (which ends in "/"),
    sorted by path."""
    found, dirs = [], [top]
    while dirs:
        with os.scandir(dirs.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.path + b"/")
                elif entry.is_file(follow_symlinks=False):
                    found.append((entry.path[len(top):], entry.stat(follow_symlinks=False)))
    found.sort()                    # by path: paths are unique, stats never compared
    return found


def sha256sum_line(digest, name):
    """One line as sha256sum prints it: a name with \\, \\n or \\r is escaped, the line
    marked by a leading backslash."""
    if b"\\" in name or b"\n" in name or b"\r" in name:
        name = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
        return b"\\%s  %s\n" % (digest, name)
    return b"%s  %s\n" % (digest, name)


def cmd_debug_sleep(api, args, cwd, stop):
    """`buck debug sleep SECONDS`: one line, then a cancellable sleep."""
    seconds = float(args[0])
    yield pb.CommandEvent(stdout=b"sleeping for %g s\n" % seconds)
    stop.wait(seconds)
    return 130 if stop.is_set() else 0


def cmd_debug_crash(api, args, cwd, stop):
    """`buck debug crash`: a simulated panic in a command."""
    raise RuntimeError("`buck debug crash` was invoked")
    yield                           # (a generator, like every command)


HANDLERS = {"hash": cmd_hash, "debug-sleep": cmd_debug_sleep, "debug-crash": cmd_debug_crash}
