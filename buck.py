#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""buck, the client of buckd, after buck2's daemon_lifecycle.md, whose sections it follows:
https://github.com/facebook/buck2/blob/main/app/buck2_daemon/daemon_lifecycle.md
buckd.py holds "daemon process flow"; workload.py, the team's file, its names and the commands
buckd runs. Slow imports (json, grpc) wait until needed."""
import os, sys, time

if sys.version_info < (3, 11):      # the floor, said before anything else can fail
    sys.exit(f"{sys.argv[0]}: needs Python 3.11 or newer, not {sys.version.split()[0]}")
if __name__ == "__main__":
    sys.modules.setdefault("buck", sys.modules["__main__"])    # workload and buckd import us
import workload                     # the team's file: its names, its commands (README, "Vendoring")
from workload import TOOL, DAEMON, MARKER       # buck, buckd, .buckconfig: the rest follows

RELEASE = "1.0.0"                   # upstream's release (CHANGELOG.md); the version is a checksum of:
SOURCES = ("buck.py", "buckd.py", "debug_commands.py", "daemon.proto", "daemon_pb2.py",
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
EXIT_INTERRUPTED = 130                  # Ctrl-C: 128 + SIGINT

STATUS_TIMEOUT = 5.0    # for a buckd to answer Status, or accept a command; else it is not usable
RECHECK_TIMEOUT = 1.0   # for it to answer once more, before we kill it: maybe *we* were paused
KILL_TIMEOUT = 2.0      # for the Kill call itself
EXIT_TIMEOUT = 5.0      # for buckd to exit once asked (then SIGKILL), and again after SIGKILL
START_TIMEOUT = 30.0    # for `buck daemon` to report that buckd serves
LOCK_TIMEOUT = 60.0     # for another client to finish starting or killing buckd
LOCK_PATIENCE = 1.0     # after this long waiting for lifecycle.lock, say for whom
ATTEMPTS = 4            # restarts and resends before we give up on a fight over buckd
CHECK_INTERVAL = 100.0  # buckd's self-check: "every 100s or so" (BUCKD_CHECK_INTERVAL)
IDLE_TIMEOUT = 3 * 3600.0   # as Bazel's --max_idle_secs (BUCKD_IDLE_TIMEOUT; 0: never)
MIN_IDLE = 1.0          # a shorter idle timeout ends buckd before its client can use it
MAX_SECONDS = 1e7       # the longest duration we accept (115 days)

HERE = os.path.dirname(os.path.realpath(__file__))
grpc = pb = pb_grpc = None      # imported by load_grpc(), by the commands that talk to buckd
_version = None
own_pid_file = None             # in buckd: the stat of the buckd.pid whose lock it holds


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
    view = memoryview(data.encode() if isinstance(data, str) else data)
    try:
        while view:
            view = view[os.write(1, view):]
    except OSError as e:
        raise Fail(f"cannot write output: {e.strerror}") from None


def shown(name):
    """A name from outside as every message shows it: one line, escaped; '' if empty."""
    text = os.fsencode(name).decode(errors="backslashreplace")     # undecodable bytes: \xff
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text) or "''"


def standard_fds():
    """Make fds 0-2 valid before we open anything: a closed one gets /dev/null, read-only."""
    fd = os.open(os.devnull, os.O_RDONLY)   # the lowest free fd: 0, 1 or 2, if one is closed
    while fd < 3:
        fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)


def open_file(path, flags=os.O_RDONLY, st=None):
    """os.open that never waits on a FIFO; in buckd it refuses buckd.pid (st: path's, if known)."""
    refusal = lambda: OSError(1, f"{DAEMON}'s own {PID_FILE}, which it holds", path)
    mine = lambda known: os.path.samestat(known, own_pid_file)    # (any name: a link, ...)
    if own_pid_file and not flags & os.O_CREAT and mine(st or os.stat(path)):
        raise refusal()
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    if own_pid_file and mine(os.fstat(fd)):
        raise refusal()             # (a race: the fd stays open, as closing it drops the lock)
    return fd


def read_file(path, limit=1 << 20):
    """The file's bytes (at most `limit`), or None if it cannot be read (missing, a FIFO...)."""
    try:
        fd = open_file(path)
        try:
            return open(fd, "rb", closefd=False).read(limit)
        finally:
            os.close(fd)            # (also when it is a directory, which open() refuses)
    except OSError:
        return None


def write_json(path, value):
    """Write value as JSON in a file (0600) under its final name at once: never half-written."""
    import json
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(json.dumps(value).encode())
    os.replace(tmp, path)


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
    raise Fail(f"{name} must be seconds from {low:g} to {high:g}, not {shown(text)}", EXIT_USAGE)


def daemon_settings():
    def setting(name, default, low):
        return seconds(os.environ.get(name, str(default)), name, low, MAX_SECONDS)
    never = os.environ.get(IDLE_TIMEOUT_ENV) == "0"
    idle = None if never else setting(IDLE_TIMEOUT_ENV, IDLE_TIMEOUT, MIN_IDLE)    # (0: never)
    return setting(CHECK_INTERVAL_ENV, CHECK_INTERVAL, 0.01), idle


# --- "There's a small set of commands/arguments that don't require the daemon (`buck help`, ...)"

COMMANDS = {            # name: (usage, help); no help: hidden. workload_commands() adds its own.
    "help": ("", "show this message"),
    "version": ("", "print this client's version"),
    "status": ("[--json] [--all]", f"report the running {DAEMON} (--all: every one of yours)"),
    "server": ("[--json]", f"make sure the {DAEMON} of this version runs, then report it"),
    "kill": ("", f"stop the running {DAEMON}"),
    "killall": ("", f"stop every {DAEMON} of yours, in every repository"),
    "daemon": ("", None),
}
USAGE_LINE = f"{TOOL} [--isolation-dir NAME] COMMAND ..."


def commands():
    return {**COMMANDS, **{name: entry[:2] for name, entry in workload_commands().items()}}


def workload_commands():
    """name -> (usage, help, handler): the team's commands, and upstream's `debug` hooks."""
    import debug_commands
    return {**workload.COMMANDS, **debug_commands.COMMANDS}


def version():
    """A checksum of SOURCES, read once per process: every edit is a new buck build."""
    global _version
    _version = _version or checksum()
    return _version


def checksum():
    import zlib                     # (0.1 ms; hashlib costs 6)
    crc = 0
    for name in SOURCES:
        data = read_file(os.path.join(HERE, name), -1)
        if data is None:
            raise Fail(f"cannot read {shown(os.path.join(HERE, name))}, one of SOURCES "
                       "(daemon_pb2*.py are generated from daemon.proto, see README.md)")
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}"


def parse(argv):
    """argv -> (isolation dir, command, operands, {option: value, "" for a flag})."""
    isolation, argv = DEFAULT_ISOLATION, list(argv)
    while argv and argv[0].split("=")[0] == "--isolation-dir":
        word = argv.pop(0)
        isolation = word.partition("=")[2] if "=" in word else (argv.pop(0) if argv else "")
        if not isolation or "/" in isolation or isolation in (".", ".."):
            raise Fail(f"bad --isolation-dir {shown(isolation)}: a name, not a path "
                       f"(usage: {USAGE_LINE})", EXIT_USAGE)
    name = max((n for n in commands() if argv[:len(n.split())] == n.split()), key=len, default=None)
    if name is None:
        raise Fail(f"{f'unknown command {shown(argv[0])}' if argv else 'no command'} "
                   f"(usage: {USAGE_LINE}; see `{TOOL} help`)", EXIT_USAGE)
    try:
        operands, options = parse_words(name, argv[len(name.split()):])
        check_usage(name, operands, options)
    except Fail as e:
        raise Fail(usage_error(name, e), EXIT_USAGE) from None
    return isolation, name, operands, options


def parse_words(name, argv):
    words, operands, options, takes = iter(argv), [], {}, options_of(name)
    for word in words:
        key, has_value, value = word.partition("=")
        if word == "--":
            operands += words
        elif not word.startswith("--"):
            operands.append(word)
        elif key not in takes or has_value and not takes[key]:
            raise Fail(f"unknown option {shown(word)}", EXIT_USAGE)
        elif key[2:] in options:
            raise Fail(f"{key} given twice", EXIT_USAGE)
        elif takes[key] and not has_value and (value := next(words, None)) is None:
            raise Fail(f"{key} needs a value", EXIT_USAGE)
        else:
            options[key[2:]] = value
    return operands, options


def options_of(name):
    spec = commands()[name][0].split()
    return {w.strip("[]").split("=")[0]: "=" in w for w in spec if w.startswith("[--")}


def check_usage(name, operands, options):
    """Fail unless operands and options fit the usage: the client checks, and buckd again."""
    unknown = sorted(set(options) - {key[2:] for key in options_of(name)})
    if unknown:
        raise Fail(f"unknown option --{shown(unknown[0])}", EXIT_USAGE)
    slots = [w for w in commands()[name][0].split() if not w.startswith("[--")]
    least = sum(not w.startswith("[") for w in slots)
    most = float("inf") if any(w.rstrip("]").endswith("...") for w in slots) else len(slots)
    if not least <= len(operands) <= most:
        raise Fail(f"{'missing' if len(operands) < least else 'extra'} operand(s)", EXIT_USAGE)


def usage_error(name, message):
    return f"{name}: {message} (usage: {' '.join([TOOL, name, commands()[name][0]]).strip()})"


def usage():
    listed = [(f"{name} {args}".strip(), text) for name, (args, text) in commands().items() if text]
    width = max(len(left) for left, _ in listed) + 2
    lines = "".join(f"  {left:<{width}}{text}\n" for left, text in listed)
    return (f"usage: {USAGE_LINE}\n\ncommands:\n{lines}\noptions:\n  --isolation-dir NAME  "
            f"use a separate {DAEMON} (default {DEFAULT_ISOLATION}), with its own daemon dir\n")


def main(argv):
    """`buck ARGV`: returns the exit code. Every failure is one line on stderr."""
    standard_fds()
    os.umask(0o077)                 # what we create under $HOME, dirs too, is the user's alone
    try:
        if not argv:
            to_stderr(usage().encode())
            return EXIT_USAGE
        isolation, name, args, options = parse(["help"] if argv[0] in ("-h", "--help") else argv)
        if name in ("help", "version"):
            out(usage() if name == "help" else f"{TOOL} {version()} (release {RELEASE})\n")
            return 0
        version()                   # now: the files this client runs, to compare with later
        if name == "daemon":
            import buckd
            return buckd.main(daemon_dir(isolation), repository_root())
        import json, signal     # (json before our Ctrl-C handler, whose step() needs it whole)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `buck hash | head` ends quietly
        signal.signal(signal.SIGINT, interrupted)
        if name in LOCAL_COMMANDS:
            return LOCAL_COMMANDS[name](isolation, options)
        return run_command(daemon_dir(isolation), isolation, name, args, options)
    except Fail as e:
        say(e)
        return e.code
    except OSError as e:
        say(f"{shown(e.filename)}: {e.strerror}" if e.filename else e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def interrupted(*_):
    """Ctrl-C once grpc may be loaded: exit now (grpc finalizers swallow KeyboardInterrupt)."""
    if trace["locked"]:
        step("restart.6")
    os._exit(EXIT_INTERRUPTED)


# --- The lifecycle log (docs/lifecycle-log.md): BUCK_LIFECYCLE_LOG=PATH, every process appends
# a JSON line per step of the doc; BUCK_LIFECYCLE_STOP_AT=STEP, it SIGSTOPs itself after STEP.
LOG_PATH, STOP_AT = os.environ.get(LOG_ENV), os.environ.get(STOP_AT_ENV)
LOG_PATH = LOG_PATH and os.path.abspath(LOG_PATH)     # buckd's cwd is "/"
trace = {"role": "client", "dir": None, "locked": False, "run": {}}     # buckd: "daemon"


def step(name, /, **fields):
    """Log step `name` of this process; never fail a command, never keep the log's fd."""
    if LOG_PATH:
        import json
        run = trace["run"].setdefault(os.getpid(), os.urandom(4).hex())
        line = {"t": time.time(), "pid": os.getpid(), "run": run, "role": trace["role"],
                "version": version(), "dir": trace["dir"], "step": name, **fields}
        try:
            with open(open_file(LOG_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab", 0) as f:
                f.write(json.dumps(line).encode() + b"\n")     # unbuffered, one write: never mixed
        except OSError:
            pass
    if name == STOP_AT:
        import signal
        os.kill(os.getpid(), signal.SIGSTOP)


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
            raise Fail(f"not in a repository: no {MARKER} in {shown(cwd)} or its parents")
        root = os.path.dirname(root)
    return root


def daemon_dir(isolation):
    """$HOME/.buck/buckd/<repo root without its leading />/<isolation dir>."""
    trace["dir"] = os.path.join(daemons_home(), repository_root().lstrip("/"), isolation)
    return trace["dir"]


def all_daemon_dirs():
    return sorted(d for d, _, files in os.walk(daemons_home()) if {PID_FILE, INFO_FILE} & {*files})


def read_info(d):
    """buckd.info as a dict, or None if it is not a complete, valid one, whatever is wrong."""
    return parse_info(read_file(os.path.join(d, INFO_FILE)))


def parse_info(raw):
    import json
    try:
        info = json.loads(raw or b"")
        fields = (("pid", int), ("port", int), ("version", str), ("auth_token", str))
        if all(type(info.get(key)) is kind for key, kind in fields) and 0 < info["port"] < 65536 \
                and info["auth_token"].isascii() and info["auth_token"].isalnum():
            return info
    except (ValueError, RecursionError, AttributeError):
        pass
    return None


def instance(info):
    """What tells one buckd from any other, now or later, without its secret token."""
    return f"{info['pid']}@{info.get('start_time')!r}"


def holder(d):
    """The running buckd's pid: who holds buckd.pid's lock, as the kernel says; or None."""
    import fcntl
    import struct
    linux = sys.platform.startswith("linux")    # struct flock's form differs on macOS, BSD
    form = "hhqqi" if linux else "qqihh"
    query = (fcntl.F_WRLCK, 0, 0, 0, 0) if linux else (0, 0, 0, fcntl.F_WRLCK, 0)
    try:
        fd = open_file(os.path.join(d, PID_FILE))
        try:
            answer = struct.unpack(form, fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(form, *query)))
        finally:
            os.close(fd)
    except OSError:                 # no file, or none one can lock (a FIFO): no buckd holds it
        return None
    kind, pid = (answer[0], answer[4]) if linux else (answer[3], answer[2])
    return None if kind == fcntl.F_UNLCK else pid


# --- "client connection and buckd startup"

def load_grpc():
    """Import grpc and the stubs beside us. grpc is quiet here; buckd gets the user's setting."""
    global grpc, pb, pb_grpc
    if grpc is None:
        quiet = "GRPC_VERBOSITY" not in os.environ
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        sys.path.insert(0, HERE)
        try:
            import grpc, daemon_pb2 as pb, daemon_pb2_grpc as pb_grpc    # (the globals)
        except ImportError as e:
            raise Fail(f"{e}: {TOOL} needs grpcio and protobuf, and daemon_pb2*.py generated "
                       f"from daemon.proto in {shown(HERE)} (see README.md)")
        finally:
            if quiet:               # grpc has read it by now
                del os.environ["GRPC_VERBOSITY"]
    return grpc, pb, pb_grpc


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
        request = pb.KillRequest(reason=reason)
        call = self.stub.Kill.future(request, timeout=KILL_TIMEOUT, metadata=self.metadata)
        return call.exception() is None


def rpc_error(e):
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)


# Why a client (re)starts buckd: the outcomes of steps 1-3 that are not a connection, named.
NO_DAEMON, CORRUPT, NOT_USABLE, MISMATCH, VANISHED = (
    "no daemon", "corrupt info", "not usable", "version mismatch", "vanished")


def connect(d, isolation):
    """Steps 1-3 of "client connection", and a (re)start when they fail: (Connection, Status)."""
    for _ in range(ATTEMPTS):
        raw = read_file(os.path.join(d, INFO_FILE))     # 1. read buckd.info
        step("connect.1", found=raw is not None)
        conn, reply, why = check_version(raw)           # 2-3. connect, check the version
        if conn:
            return conn, reply
        restart(d, isolation, raw, why)
    raise Fail(f"gave up after {ATTEMPTS} attempts: {DAEMON} keeps being replaced "
               "(is a client of another version running?)")


def check_version(raw, timeout=STATUS_TIMEOUT):
    """Steps 2-3: (connection, Status reply, None) or (None, None, (outcome, why))."""
    info = parse_info(raw)
    if info is None:
        return None, None, (CORRUPT, f"{INFO_FILE} is corrupt") if raw else (NO_DAEMON, f"no {DAEMON} was running")
    conn = Connection(info)
    try:
        reply = conn.status(timeout).result()
    except grpc.RpcError as e:
        return None, None, (NOT_USABLE, f"{DAEMON} (pid {info['pid']}) is not usable ({rpc_error(e)})")
    step("connect.3", daemon_pid=reply.pid, daemon_version=reply.version, ok=reply.version == version())
    if reply.version != version():
        return None, None, (MISMATCH, f"{DAEMON} version mismatch (daemon {reply.version}, client {version()})")
    return conn, reply, None


def restart(d, isolation, seen, why):
    """"To start/restart the buckd process", steps 1-6, unless buckd no longer needs it."""
    with lifecycle_lock(d):                 # 1. lock "lifecycle.lock"; 6. release it on leaving
        if another_client_restarted(d, seen) or answers_now(seen, why):
            return
        why = explain(d, seen, why)
        may_restart(seen, why)
        say(f"{'starting' if why[0] in (NO_DAEMON, VANISHED) else 'restarting'} {DAEMON}: {why[1]}")
        kill_daemon(d, f"{DAEMON} was restarted by pid {os.getpid()}: {why[1]}")   # 2-3. kill it
        start_daemon(d, isolation, why)                 # 4-5. run `buck daemon`, wait until ready


def another_client_restarted(d, seen):
    """Has buckd.info changed since `seen`? First wait for a buckd still starting."""
    pid, named = holder(d), lambda: (read_info(d) or {}).get("pid") == pid
    age = time.time() - os.path.getmtime(os.path.join(d, PID_FILE)) if pid else START_TIMEOUT
    if pid and 0 <= age < START_TIMEOUT and not named():
        poll(lambda: holder(d) != pid or named(), START_TIMEOUT - age)
    return read_file(os.path.join(d, INFO_FILE)) != seen


def answers_now(seen, why):
    """Ask the buckd that did not answer once more: maybe *we* were paused (Ctrl-Z, sleep)."""
    return why[0] == NOT_USABLE and check_version(seen, RECHECK_TIMEOUT)[0] is not None


def explain(d, seen, why):
    """Why we start buckd, with how the last one ended; a crash is said, its logs kept."""
    info = parse_info(seen)
    if info and holder(d) is None:
        keep_logs(d)
        say(f"{DAEMON} crashed, see {crash_log(d, info['pid'])}")
        end = how_it_ended(d) or "no record"
        return VANISHED, f"{DAEMON} (pid {info['pid']}) crashed or vanished ({end})"
    end = how_it_ended(d) if why[0] == NO_DAEMON else None
    return why[0], why[1] + (f" (the last one, {end})" if end else "")


def may_restart(seen, why):
    """Fail on bad settings, on our own files changed on disk, or inside the buckd to kill."""
    try:
        daemon_settings()
    except Fail as e:
        raise Fail(f"{DAEMON} cannot start: {e}") from None
    if checksum() != version():
        raise Fail(f"{TOOL}'s files changed on disk since this command started (an upgrade?): "
                   "run it again; killing nothing")
    info = parse_info(seen)
    if info and why[0] != VANISHED and os.environ.get(INSTANCE_ENV) == instance(info):
        raise Fail(f"this command runs inside {DAEMON} (pid {info['pid']}), which it would have "
                   f"to restart ({why[1]}): refusing to kill the {DAEMON} that runs it")


def keep_logs(d):
    """Move buckd.stdout, .stderr and .end into prev/, where they outlive the next start."""
    os.makedirs(os.path.join(d, PREV_DIR), exist_ok=True)
    for name in (STDOUT_FILE, STDERR_FILE, END_FILE):
        if os.path.exists(os.path.join(d, name)):
            os.replace(os.path.join(d, name), os.path.join(d, PREV_DIR, name))


def crash_log(d, pid):
    """Buckd `pid`'s stderr, found by the pid its first line names, and its last 20 lines."""
    logs = [(path, read_file(path, -1) or b"") for path in
            (os.path.join(d, STDERR_FILE), os.path.join(d, PREV_DIR, STDERR_FILE))]
    path, text = next(((p, t) for p, t in logs if f" pid {pid} ".encode() in t[:200]), logs[0])
    lines = text[-8192:].decode(errors="replace").splitlines()[-20:]
    return shown(path) + "".join(f"\n  | {line}" for line in lines)


def how_it_ended(d):
    """How d's last buckd ended (its END_FILE, in d or prev/), in words; or None."""
    for end in map(end_record, (d, os.path.join(d, PREV_DIR))):     # (prev/ only if need be)
        if end.get("how"):
            return f"pid {end['pid']} ended by {end['how']}: {end['why']}"
        if end:
            return f"pid {end['pid']} vanished without a word (SIGKILL, or out of memory?)"
    return None


def end_record(where):
    """END_FILE in dir `where`: {"pid"}, and once that buckd ended "how" and "why"; or {}."""
    import json
    try:
        end = json.loads(read_file(os.path.join(where, END_FILE)) or b"")
        return end if type(end) is dict and type(end.get("pid")) is int else {}
    except (ValueError, RecursionError):
        return {}


# "When the client is killing or starting the buckd process, it will grab an exclusive lock
# on the "lifecycle.lock" file in the daemon directory"
class lifecycle_lock:
    """The flock a client holds to kill or start buckd; it names its holder inside."""

    def __init__(self, d):
        self.d = d

    def __enter__(self):
        os.makedirs(self.d, exist_ok=True)
        self.fd = open_file(os.path.join(self.d, LOCK_FILE), os.O_RDWR | os.O_CREAT)
        if not poll(self.take, LOCK_PATIENCE):
            whom = shown(os.pread(self.fd, 200, 0).decode(errors="replace").strip())
            say(f"waiting for another {TOOL} client to finish starting or killing {DAEMON}: {whom}")
            if not poll(self.take, LOCK_TIMEOUT):
                os.close(self.fd)
                raise Fail(f"timed out after {LOCK_TIMEOUT:.0f} s waiting for {LOCK_FILE} (held by: {whom})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}: {command_line()}\n".encode(), 0)
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


def command_line():
    return shown(" ".join([TOOL, *sys.argv[1:]]))


def kill_daemon(d, reason):
    """Steps 2-3: ask buckd to exit, then see it gone by pid (SIGTERM, then SIGKILL)."""
    import signal
    pid = holder(d)
    step("restart.2", daemon_pid=pid, reason=reason)
    if pid is None:
        return None
    info, how = read_info(d), "rpc"
    if not (info and info["pid"] == pid and Connection(info).kill(reason)):
        how = "sigterm"             # the same request, as a signal: buckd exits cleanly
        signal_buckd(d, pid, signal.SIGTERM, reason)
    gone = lambda: holder(d) != pid
    if not poll(gone, EXIT_TIMEOUT):
        how = "sigkill"
        signal_buckd(d, pid, signal.SIGKILL, reason)
        if not poll(gone, EXIT_TIMEOUT):
            raise Fail(f"could not kill {DAEMON} (pid {pid})")
        if (read_info(d) or {}).get("pid") == pid:     # it could not remove its buckd.info: we do
            os.unlink(os.path.join(d, INFO_FILE))
    step("restart.3", daemon_pid=pid, how=how)
    return pid


def signal_buckd(d, pid, sig, reason):
    """Record who kills pid and why, then signal it, only if it holds buckd.pid's lock."""
    if pid > 1 and pid != os.getpid() and holder(d) == pid:
        if end_record(d).get("how") in (None, "kill"):     # (unless buckd has said how it ends)
            end = {"pid": pid, "how": "kill", "why": f"{reason} ({sig.name})"}
            write_json(os.path.join(d, END_FILE), end)     # (a signal does not say who, or why)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass                    # it has just exited


def start_daemon(d, isolation, why):
    """Steps 4-5: run `buck daemon` (why in its env) until buckd serves; exit 3, a kill: retry."""
    import subprocess
    told = f"{why[1]} (by pid {os.getpid()}: {command_line()})"
    argv = [sys.executable, os.path.realpath(__file__), "--isolation-dir", isolation, "daemon"]
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
    step("restart.4", exit=proc.returncode, why=why[1])
    if proc.returncode == 0:
        step("restart.5", daemon_pid=holder(d))
    elif proc.returncode > 0 and proc.returncode != EXIT_ALREADY_RUNNING:
        said = (err.decode(errors="replace").strip().splitlines() or ["no reason given"])[-1]
        raise Fail(f"{DAEMON} failed to start: {said.removeprefix(f'{TOOL}: ')}")


# --- "buck kill and other daemon restarts", and the commands that report daemons

def cmd_kill(isolation, options):
    """`buck kill`: steps 1-3 and 6 of "start/restart"; the user's word, even from inside buckd."""
    d = daemon_dir(isolation)
    with lifecycle_lock(d):
        pid = kill_daemon(d, f"`{TOOL} kill` was invoked by pid {os.getpid()}")
    out(f"{DAEMON} killed (pid {pid})\n" if pid is not None else f"no {DAEMON} running\n")
    return 0


def cmd_killall(isolation, options):
    """`buck killall`: `kill` in every daemon dir, but never the buckd running us."""
    failures = 0
    for d in all_daemon_dirs():
        trace["dir"] = d
        try:
            with lifecycle_lock(d):
                info = read_info(d)
                if holder(d) is None or info and os.environ.get(INSTANCE_ENV) == instance(info):
                    continue
                pid = kill_daemon(d, f"`{TOOL} killall` was invoked by pid {os.getpid()}")
            out(f"{DAEMON} killed (pid {pid}) in {shown(d)}\n")
        except (Fail, OSError) as e:
            say(f"{shown(d)}: {e}")
            failures += 1
    return EXIT_FAILED if failures else 0


def cmd_server(isolation, options):
    return print_status([status_fields(connect(daemon_dir(isolation), isolation)[1])], options)


def cmd_status(isolation, options):
    """Report buckd (--all: every one, asked at once), whatever its version; start none."""
    every = "all" in options
    asked = [(d, *ask_status(d)) for d in (all_daemon_dirs() if every else [daemon_dir(isolation)])]
    rows = [status_row(*row, patience=0 if every else EXIT_TIMEOUT) for row in asked]
    if not every and rows[0]["state"] not in ("running", "dead", "none"):
        raise Fail(f"{DAEMON} (pid {rows[0]['pid']}) is {rows[0]['state']}")
    return print_status([row for row in rows if row["state"] != "none" or not every], options, every)


def ask_status(d):
    pid, info = holder(d), read_info(d)
    return pid, info, Connection(info).status() if info and info["pid"] == pid else None


def status_row(d, pid, info, call, patience):
    """d as `status` shows it: running, not responding, starting, dead or none."""
    if call:
        try:
            return status_fields(call.result())
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or not poll(lambda: holder(d) != pid, patience):
                return {"daemon_dir": d, "pid": pid, "state": f"not responding: {rpc_error(e)}"}
            pid = None              # it was shutting down, and now it is gone
    state = f"starting, not named in {INFO_FILE} yet" if pid is not None else "dead" if info else "none"
    return {"daemon_dir": d, "pid": (info or {}).get("pid") if pid is None else pid, "state": state,
            "previous_end": how_it_ended(d) or ""}


def status_fields(reply):
    fields = {n: getattr(reply, n) for n in reply.DESCRIPTOR.fields_by_name if n != "figures"}
    return {"state": "running", **fields, **dict(reply.figures)}


def print_status(rows, options, every=False):
    import json
    if "json" in options:
        out(json.dumps(rows if every else rows[0]) + "\n")
    elif every:
        out("".join(status_line(row) + "\n" for row in rows) or f"no {DAEMON} running\n")
    elif rows[0]["state"] == "running":
        out(f"{DAEMON} is running" + "".join(f"\n  {k}: {v}" for k, v in rows[0].items() if k != "state") + "\n")
    else:
        end = rows[0]["previous_end"]
        out(f"no {DAEMON} running\n" + (f"the last one, {end}\n" if end else ""))
    return 0


def status_line(row):
    if row["state"] != "running":
        return f"{shown(row['daemon_dir'])}: {row['state']} (pid {row['pid']})"
    return (f"{shown(row['daemon_dir'])}: pid {row['pid']}, version {row['version']}, "
            f"up {row['uptime_s']:.0f} s, {row['active_commands']} running, idle {row['idle_s']:.0f} s, "
            f"started because: {row['started_because']}")


def run_command(d, isolation, name, operands, options):
    """Send a command to buckd on the checked connection; resend only until it is accepted."""
    import queue
    import threading
    load_grpc()
    refusals = {grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE, grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_FAILED}
    request = pb.CommandRequest(name=name, args=[os.fsencode(a) for a in operands],
                                options=options, cwd=os.fsencode(os.getcwd()))
    for _ in range(ATTEMPTS):
        conn, reply = connect(d, isolation)
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
    step("command", daemon_pid=reply.pid, name=name)
    while isinstance(event := events.get(), pb.CommandEvent):
        kind = event.WhichOneof("event")
        if kind == "stdout":
            out(event.stdout)
        elif kind == "stderr":
            to_stderr(event.stderr)
        elif kind == "exit_code":
            return event.exit_code
        elif kind == "shutdown":
            raise Fail(f"{DAEMON} shut down during the command: {event.shutdown}")
    if event is None:
        raise Fail(f"{DAEMON} ended the command without an exit code")
    raise Fail(f"lost {DAEMON} (pid {reply.pid}) during the command ({rpc_error(event)}); "
               f"it crashed or was killed, see {crash_log(d, reply.pid)}")


def read_stream(stream, events):
    """Queue a stream's events, then None or its error (the reader waits with a timeout)."""
    try:
        for event in stream:
            events.put(event)
        events.put(None)
    except grpc.RpcError as e:
        events.put(e)


def handshake(request, accepted):
    """Our side of a Command stream: the command, then the go-ahead once it is accepted."""
    yield request
    accepted.wait()
    yield pb.CommandRequest()


LOCAL_COMMANDS = {"status": cmd_status, "server": cmd_server, "kill": cmd_kill, "killall": cmd_killall}

def entry():
    """`python buck.py ...` and a vendored launcher: run main, exit with its code."""
    try:
        code = main(sys.argv[1:])
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    os._exit(code)                  # skip interpreter teardown: grpc's threads make it slow


if __name__ == "__main__":
    entry()
