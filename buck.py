#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""buck, the command line of a tool with a daemon, after buck2's daemon_lifecycle.md:
https://github.com/facebook/buck2/blob/main/app/buck2_daemon/daemon_lifecycle.md
Here: the names, main, the lifecycle log, the daemon dir. buckd.py: the lifecycle, both sides;
buck_commands.py: the commands around it; workload.py: the team's names and commands."""
import os, sys, time
import _signal                      # (signal's C half, loaded already: `import signal` costs 5 ms)

EXIT_INTERRUPTED = 130              # Ctrl-C: 128 + SIGINT


def quiet_ctrl_c():
    """Ctrl-C exits at once and quietly (unless it is ignored: a background job). In a program
    run as buck, from its first line; a program that imports buck keeps its own."""
    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))


if sys.version_info < (3, 11):      # the floor, said before anything else can fail
    sys.exit(f"{sys.argv[0]}: needs Python 3.11 or newer, not {sys.version.split()[0]}")
if __name__ == "__main__":
    quiet_ctrl_c()
    sys.modules.setdefault("buck", sys.modules["__main__"])    # workload and buckd import us
try:
    import workload                 # the team's file: its names, its commands (README, "Vendoring")
except ImportError as e:
    sys.exit(f"{sys.argv[0]}: {e}: workload.py, the team's file, goes beside buck.py")
from workload import TOOL, DAEMON, MARKER       # buck, buckd, .buckconfig: the rest follows

RELEASE = "1.1.0"                   # upstream's (CHANGELOG.md); the version is a checksum of:
SOURCES = ("buck.py", "buckd.py", "buck_commands.py", "daemon.proto", "daemon_pb2.py",
           "daemon_pb2_grpc.py", *workload.SOURCES)
STATE_DIR = f".{TOOL}"                  # daemon dirs: $HOME/.buck/buckd/<repo root>/<isolation>
DEFAULT_ISOLATION = "v2"                # the isolation dir when --isolation-dir is not given
PID_FILE, INFO_FILE = f"{DAEMON}.pid", f"{DAEMON}.info"            # buckd.pid, buckd.info
STDOUT_FILE, STDERR_FILE = f"{DAEMON}.stdout", f"{DAEMON}.stderr"  # buckd.stdout, buckd.stderr
END_FILE = f"{DAEMON}.end"              # buckd.end: how the last buckd ended (or that it runs)
LOCK_FILE, PREV_DIR = "lifecycle.lock", "prev"
TOKEN_KEY = f"{DAEMON}-token"           # buckd-token: the gRPC metadata with buckd's token
# The environment: BUCKD_... is what buckd alone reads or sets, BUCK_... what every process reads.
CHECK_INTERVAL_ENV = f"{DAEMON.upper()}_CHECK_INTERVAL"    # BUCKD_CHECK_INTERVAL
IDLE_TIMEOUT_ENV = f"{DAEMON.upper()}_IDLE_TIMEOUT"        # BUCKD_IDLE_TIMEOUT
STARTED_ENV = f"{DAEMON.upper()}_STARTED_BECAUSE"          # why a client starts buckd, by whom
INSTANCE_ENV = f"{DAEMON.upper()}_INSTANCE"                # buckd marks the processes it runs
LOG_ENV = f"{TOOL.upper()}_LIFECYCLE_LOG"                  # BUCK_LIFECYCLE_LOG
STOP_AT_ENV = f"{TOOL.upper()}_LIFECYCLE_STOP_AT"          # BUCK_LIFECYCLE_STOP_AT

EXIT_FAILED, EXIT_USAGE = 1, 2          # a failure, said in one line; bad arguments
EXIT_ALREADY_RUNNING = 3                # `buck daemon`: another buckd holds buckd.pid
EXIT_PANIC = 101                        # buckd's panic(), as rust's panic exits

STATUS_TIMEOUT = 5.0    # for a buckd to answer Status, or accept a command; else it is not usable
RECHECK_TIMEOUT = 1.0   # for it to answer once more, before we kill it: maybe *we* were paused
KILL_TIMEOUT = 2.0      # for the Kill call itself
EXIT_TIMEOUT = 5.0      # for buckd to exit once asked (then SIGKILL), and again after SIGKILL
START_TIMEOUT = 30.0    # for `buck daemon` to report that buckd serves
LOCK_TIMEOUT = 60.0     # for another client to finish starting or killing buckd
LOCK_PATIENCE = 1.0     # after this long waiting for lifecycle.lock, say for whom
KILLALL_PATIENCE = 2.0  # killall waits this long for a lifecycle.lock another client holds
ATTEMPTS = 4            # connections one command may try, restarts included; then it gives up
CHECK_INTERVAL = 100.0  # buckd's self-check: "every 100s or so" (BUCKD_CHECK_INTERVAL)
IDLE_TIMEOUT = 3 * 3600.0   # as Bazel's --max_idle_secs (BUCKD_IDLE_TIMEOUT; 0: never)
MIN_IDLE = 1.0          # a shorter idle timeout ends buckd before its client can use it
MAX_SECONDS = 1e7       # the longest duration we accept (115 days)
SETTINGS = {CHECK_INTERVAL_ENV: ("check_interval_s", CHECK_INTERVAL, 0.01),  # buckd's settings: its
            IDLE_TIMEOUT_ENV: ("idle_timeout_s", IDLE_TIMEOUT, MIN_IDLE)}    # field, default, least

HERE = os.path.dirname(os.path.realpath(__file__))
STUBS = ("daemon_pb2*.py are generated from daemon.proto: python3 -m grpc_tools.protoc -I. "
         "--python_out=. --grpc_python_out=. daemon.proto")
_version = None


class Fail(Exception):
    """A failure to report on stderr as `buck: <message>`, never as a traceback."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


def say(message):
    to_stderr(f"{TOOL}: {message}\n".encode(errors="backslashreplace"))


def to_stderr(data):
    try:
        os.write(2, data)
    except OSError:
        pass                        # closed or full: there is no one to tell


def out(data):
    """Write all of data to stdout, or fail: a full disk or a closed stdout is a failure."""
    view = memoryview(data.encode(errors="backslashreplace") if isinstance(data, str) else data)
    try:
        while view:
            view = view[os.write(1, view):]
    except OSError as e:
        raise Fail(f"cannot write output: {e.strerror}") from None


def printable(name):
    """A name from outside as every message shows it: one line, escaped; '' if empty."""
    try:
        text = os.fsencode(name).decode(errors="backslashreplace")    # undecodable bytes: \xff
    except UnicodeEncodeError:
        text = name                 # a lone surrogate: escaped below
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text) or "''"


def standard_fds():
    """Make fds 0-2 valid before we open anything: a closed one gets /dev/null, read-only."""
    fd = os.open(os.devnull, os.O_RDONLY)   # the lowest free fd: 0, 1 or 2, if one is closed
    while fd < 3:
        fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)


def open_file(path, flags=os.O_RDONLY, st=None, refuse=None):
    """os.open that never waits on a FIFO, and refuses the file whose stat is `refuse`, by any
    name: in buckd, its buckd.pid, as closing any fd of it drops the lock. st: path's, if known."""
    refusal = OSError(1, f"{DAEMON}'s own {PID_FILE}, which it holds", path)
    if refuse and not flags & os.O_CREAT and os.path.samestat(st or os.stat(path), refuse):
        raise refusal
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    if refuse and os.path.samestat(os.fstat(fd), refuse):
        raise refusal               # (a race: the fd stays open, as closing it drops the lock)
    return fd


def read_file(path, flags=0, limit=1 << 20, tail=False):
    """The file's bytes (at most `limit`; tail: its last ones), or None if it cannot be read
    (missing, a FIFO...)."""
    try:
        fd = open_file(path, os.O_RDONLY | flags)
        try:
            if tail:
                os.lseek(fd, max(0, os.fstat(fd).st_size - limit), os.SEEK_SET)
            return open(fd, "rb", closefd=False).read(limit)
        finally:
            os.close(fd)            # (also when it is a directory, which open() refuses)
    except OSError:
        return None


def write_json(path, value):
    """Write value as JSON in a file (0600) under its final name at once: never half-written;
    but on a full disk over the old file, in the blocks it frees. An error names path."""
    import json
    data, tmp = json.dumps(value).encode(), f"{path}.{os.getpid()}.tmp"
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno != 28:           # (ENOSPC)
            raise OSError(e.errno, e.strerror, path) from None
        write_file(path, data)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)          # (a full disk, a directory in the way: nothing left behind)


def write_file(path, data):
    with open(open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW), "wb") as f:
        f.write(data)


def poll(condition, timeout, interval=0.005):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def seconds(text, name, low, high):
    """The one parser of numbers from outside: plain decimal, from low to high, or a usage error."""
    if text.isascii() and text.replace(".", "", 1).isdigit() and low <= float(text) <= high:
        return float(text)
    problem = f"{name} must be seconds from {low:g} to {high:g}, not {printable(text)}"
    raise Fail(problem, EXIT_USAGE)


def daemon_settings(given_only=False):
    """buckd's settings from the environment, {field: seconds}; given_only: those a client sets."""
    return {SETTINGS[name][0]: setting(name, os.environ.get(name, str(SETTINGS[name][1])))
            for name in SETTINGS if name in os.environ or not given_only}


def setting(name, text):
    """A daemon setting's seconds, within its bounds (idle timeout 0: never), or a usage error."""
    if name == IDLE_TIMEOUT_ENV and seconds(text, name, 0, MAX_SECONDS) == 0:
        return 0.0
    return seconds(text, name, SETTINGS[name][2], MAX_SECONDS)


# --- "There's a small set of commands/arguments that don't require the daemon (`buck help`, ...)"

def version():
    """A checksum of SOURCES, read once per process: every edit is a new buck build."""
    global _version
    _version = _version or checksum()
    return _version


def checksum():
    import zlib                     # (hashlib takes 6 ms to import)
    crc = 0
    for name in SOURCES:
        data = read_file(os.path.join(HERE, name), limit=-1)
        if data is None:
            path = printable(os.path.join(HERE, name))
            raise Fail(f"cannot read {path}, one of SOURCES ({STUBS})")
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}"


def main(argv):
    """`buck ARGV`: returns the exit code. Every failure is one line on stderr."""
    standard_fds()
    os.umask(0o077)                 # what we create under $HOME, dirs too, is the user's alone
    try:
        import buck_commands        # the command table and its parser (compiled once, cached)
        if not argv:
            to_stderr(buck_commands.usage().encode())
            return EXIT_USAGE
        words = ["help"] if argv[0] in ("-h", "--help") else argv
        isolation, name, args, options = buck_commands.parse(words)
        if name == "help":
            out(buck_commands.usage())
            return 0
        if name == "version":
            out(f"{TOOL} {version()} (release {RELEASE})\n")
            return 0
        version()                   # now: the files this client runs, to compare with later
        import buckd                # the lifecycle, both sides
        if name == "daemon":
            return buckd.main(owned(daemon_dir(isolation)), repository_root())
        return buckd.client(isolation, name, args, options)
    except Fail as e:
        say(e)
        return e.code
    except OSError as e:
        say(f"{printable(e.filename)}: {e.strerror}" if e.filename else e)
        return EXIT_FAILED


# --- The lifecycle log (docs/lifecycle-log.md): BUCK_LIFECYCLE_LOG=PATH, every process appends
# a JSON line per step of the doc; BUCK_LIFECYCLE_STOP_AT=STEP, it SIGSTOPs itself after STEP.
LOG_PATH, STOP_AT = os.environ.get(LOG_ENV), os.environ.get(STOP_AT_ENV)
LOG_PATH = LOG_PATH and os.path.abspath(LOG_PATH)     # buckd's cwd is "/"
run_ids = {}                        # pid -> a run id: a buckd forked from us is another run


def step(name, d, /, role="client", refuse=None, **fields):
    """Log step `name` of this process in daemon dir d; never fail a command, never keep the fd."""
    if LOG_PATH:
        import json
        run = run_ids.setdefault(os.getpid(), os.urandom(4).hex())
        line = {"t": time.time(), "pid": os.getpid(), "run": run, "role": role,
                "version": version(), "dir": d, "step": name, **fields}
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            with open(open_file(LOG_PATH, flags, refuse=refuse), "ab", 0) as f:
                f.write(json.dumps(line).encode() + b"\n")     # unbuffered, one write: never mixed
        except OSError:
            pass
    if name == STOP_AT:
        os.kill(os.getpid(), _signal.SIGSTOP)


# --- "a directory in $HOME/.buck specific to that repository+output directory"

def daemons_home():
    home = os.environ.get("HOME")
    if not home:
        raise Fail(f"HOME is not set: {DAEMON} keeps its files in $HOME/{STATE_DIR}")
    return os.path.join(os.path.abspath(home), STATE_DIR, DAEMON)


def repository_root():
    cwd = root = os.getcwd()
    while not os.path.isfile(os.path.join(root, MARKER)):
        if root == os.path.dirname(root):
            raise Fail(f"not in a repository: no {MARKER} in {printable(cwd)} or its parents")
        root = os.path.dirname(root)
    return root


def daemon_dir(isolation):
    """$HOME/.buck/buckd/<repo root without its leading />/<isolation dir>."""
    return os.path.join(daemons_home(), repository_root().lstrip("/"), isolation)


def owned(d):
    """d, once we know that it and each dir above it up to $HOME/.buck that exists is the
    caller's own: what another user put there (root with a user's HOME) never steers us."""
    path, top = d, os.path.dirname(daemons_home())
    while True:
        for st in (os.lstat(path), os.stat(path)) if os.path.lexists(path) else ():
            if st.st_uid != os.geteuid():
                whose = f"belongs to uid {st.st_uid}, not to you"
                raise Fail(f"{printable(path)} {whose}: refusing to use it")
        if path == top or path == os.path.dirname(path):
            return d
        path = os.path.dirname(path)


def entry():
    """`python buck.py ...`, and a vendored launcher: run main, exit with its code."""
    quiet_ctrl_c()
    os._exit(main(sys.argv[1:]))    # skip interpreter teardown: grpc's threads make it slow


if __name__ == "__main__":
    entry()
