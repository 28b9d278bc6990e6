#!/usr/bin/env python3
# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""buck, the client of buckd, after buck2's daemon_lifecycle.md, whose sections it follows:
https://github.com/facebook/buck2/blob/main/app/buck2_daemon/daemon_lifecycle.md
buckd.py holds "daemon process flow" and the daemon dir's files; workload.py, the team's file,
its names and the commands buckd runs. Slow imports (json, grpc, buckd) wait until needed."""
import os, stat, sys, time

if sys.version_info < (3, 11):      # the floor, said before anything else can fail
    sys.exit(f"{sys.argv[0]}: needs Python 3.11 or newer, not {sys.version.split()[0]}")
if __name__ == "__main__":
    sys.modules.setdefault("buck", sys.modules["__main__"])    # workload and buckd import us
try:
    import workload                 # the team's file: its names, its commands (README, "Vendoring")
except ImportError as e:
    sys.exit(f"{sys.argv[0]}: {e}: workload.py, the team's file, goes beside buck.py")
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
KILLALL_PATIENCE = 2.0  # killall waits this long for a lifecycle.lock another client holds
ATTEMPTS = 4            # connections one command may try, restarts included; then it gives up
CHECK_INTERVAL = 100.0  # buckd's self-check: "every 100s or so" (BUCKD_CHECK_INTERVAL)
IDLE_TIMEOUT = 3 * 3600.0   # as Bazel's --max_idle_secs (BUCKD_IDLE_TIMEOUT; 0: never)
MIN_IDLE = 1.0          # a shorter idle timeout ends buckd before its client can use it
MAX_SECONDS = 1e7       # the longest duration we accept (115 days)
SETTINGS = {CHECK_INTERVAL_ENV: ("check_interval_s", CHECK_INTERVAL, 0.01),   # buckd's settings:
            IDLE_TIMEOUT_ENV: ("idle_timeout_s", IDLE_TIMEOUT, MIN_IDLE)}     # field, default, least

HERE = os.path.dirname(os.path.realpath(__file__))
STUBS = ("daemon_pb2*.py are generated from daemon.proto: python3 -m grpc_tools.protoc -I. "
         "--python_out=. --grpc_python_out=. daemon.proto")
grpc = pb = pb_grpc = buckd = None  # imported by the commands that need them
_version = None
held_locks = set()                  # the daemon dirs whose lifecycle.lock we hold


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


def read_file(path, flags=0, limit=1 << 20):
    """The file's bytes (at most `limit`), or None if it cannot be read (missing, a FIFO...)."""
    try:
        fd = open_file(path, os.O_RDONLY | flags)
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
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as f:
            f.write(json.dumps(value).encode())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)          # (a full disk, a directory in the way: nothing left behind)


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
    raise Fail(f"{name} must be seconds from {low:g} to {high:g}, not {printable(text)}", EXIT_USAGE)


def daemon_settings(given_only=False):
    """buckd's settings from the environment, {field: seconds}; given_only: those a client sets."""
    return {SETTINGS[name][0]: setting(name, os.environ.get(name, str(SETTINGS[name][1])))
            for name in SETTINGS if name in os.environ or not given_only}


def setting(name, text):
    """A daemon setting's seconds, within its bounds (an idle timeout of 0: never); else a usage error."""
    never = name == IDLE_TIMEOUT_ENV and text in ("0", "0.0")
    return 0.0 if never else seconds(text, name, SETTINGS[name][2], MAX_SECONDS)


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
    import zlib                     # (hashlib takes 6 ms to import)
    crc = 0
    for name in SOURCES:
        data = read_file(os.path.join(HERE, name), limit=-1)
        if data is None:
            raise Fail(f"cannot read {printable(os.path.join(HERE, name))}, one of SOURCES ({STUBS})")
        crc = zlib.crc32(data, crc)
    return f"{crc:08x}"


def parse(argv):
    """argv -> (isolation dir, command, operands, {option: value, "" for a flag})."""
    isolation, argv = DEFAULT_ISOLATION, list(argv)
    while argv and argv[0].split("=")[0] == "--isolation-dir":
        word = argv.pop(0)
        if "=" in word:
            isolation = word.partition("=")[2]
        else:
            isolation = argv.pop(0) if argv else ""
        if not isolation or "/" in isolation or isolation in (".", ".."):
            raise Fail(f"bad --isolation-dir {printable(isolation)}: a name, not a path "
                       f"(usage: {USAGE_LINE})", EXIT_USAGE)
    known = [name for name in commands() if argv[:len(name.split())] == name.split()]
    if not known:
        what = f"unknown command {printable(argv[0])}" if argv else "no command"
        raise Fail(f"{what} (usage: {USAGE_LINE}; see `{TOOL} help`)", EXIT_USAGE)
    name = max(known, key=len)
    try:
        operands, options = parse_words(name, argv[len(name.split()):])
        check_usage(name, operands, options)
    except Fail as e:
        raise Fail(usage_error(name, e), EXIT_USAGE) from None
    return isolation, name, operands, options


def parse_words(name, argv):
    """Operands, and options as the usage writes them: a flag "--x", an option "--x=VALUE"."""
    words, operands, options, takes = iter(argv), [], {}, options_of(name)
    for word in words:
        key, has_value, value = word.partition("=")
        if word == "--":
            operands += words
        elif not word.startswith("--"):
            operands.append(word)
        elif key not in takes:
            raise Fail(f"unknown option {printable(key)}", EXIT_USAGE)
        elif key[2:] in options:
            raise Fail(f"{key} given twice", EXIT_USAGE)
        elif takes[key] and not has_value:
            raise Fail(f"{key} needs a value, as {key}=VALUE", EXIT_USAGE)
        elif has_value and not takes[key]:
            raise Fail(f"{key} takes no value", EXIT_USAGE)
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
        raise Fail(f"unknown option --{printable(unknown[0])}", EXIT_USAGE)
    slots = [w for w in commands()[name][0].split() if not w.startswith("[--")]
    least = sum(not w.startswith("[") for w in slots)
    most = float("inf") if any(w.rstrip("]").endswith("...") for w in slots) else len(slots)
    if len(operands) < least:
        raise Fail("missing operand(s)", EXIT_USAGE)
    if len(operands) > most:
        raise Fail("extra operand(s)", EXIT_USAGE)


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
    global buckd
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
        import buckd                # the daemon, and its daemon dir's files
        if name == "daemon":
            return buckd.main(owned(daemon_dir(isolation)), repository_root())
        import json, signal     # (json before our Ctrl-C handler, whose step() needs it whole)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `buck hash | head` ends quietly
        signal.signal(signal.SIGINT, interrupted)
        if name in LOCAL_COMMANDS:
            return LOCAL_COMMANDS[name](isolation, options)
        return run_command(owned(daemon_dir(isolation)), isolation, name, args, options)
    except Fail as e:
        say(e)
        return e.code
    except OSError as e:
        say(f"{printable(e.filename)}: {e.strerror}" if e.filename else e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def interrupted(*_):
    """Ctrl-C once grpc may be loaded: exit now (grpc finalizers swallow KeyboardInterrupt)."""
    for d in list(held_locks):
        step("restart.6", d)
    os._exit(EXIT_INTERRUPTED)


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
                raise Fail(f"{printable(path)} belongs to uid {st.st_uid}, not to you: refusing to use it")
        if path == top or path == os.path.dirname(path):
            return d
        path = os.path.dirname(path)


# --- "client connection and buckd startup"

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
        """The Kill call, under way: its .exception() is None once buckd took it."""
        request = pb.KillRequest(reason=reason)
        return self.stub.Kill.future(request, timeout=KILL_TIMEOUT, metadata=self.metadata)


def rpc_error(e):
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)


class Why:
    """Why a client (re)starts buckd: an outcome of steps 1-3 that is not a connection, named
    (as buck2's connect.rs names them), and the words that say it."""

    def __init__(self, outcome, text):
        self.outcome, self.text = outcome, text


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
        raw = read_file(os.path.join(d, INFO_FILE), os.O_NOFOLLOW)     # 1. read buckd.info
        step("connect.1", d, found=raw is not None)
        conn, reply, why = check_version(d, raw)                      # 2-3. connect, check
        if conn:
            apply_settings(d, conn, reply)
            yield conn, reply
        else:
            restart(d, isolation, raw, why)
    raise Fail(f"gave up after {ATTEMPTS} attempts to reach a {DAEMON} of this version that takes "
               "the command: it keeps being replaced (is a client of another version running?)")


# Correctness 3, "A client only uses a buckd connection after making sure it has a compatible
# version": a Connection is only ever returned here, after a Status naming our version.
def check_version(d, raw, timeout=STATUS_TIMEOUT):
    """Steps 2-3: (Connection, Status reply, None), or (None, None, Why)."""
    info, pid = buckd.parse_info(raw), buckd.holder(d)
    if info is None and (raw or pid):
        what = "corrupt" if raw else f"missing, while pid {pid} holds {PID_FILE}"
        return None, None, Why(CORRUPT, f"{INFO_FILE} is {what}")
    if info is None:
        return None, None, Why(NO_DAEMON, f"no {DAEMON} was running")
    conn = Connection(info)
    try:
        reply = conn.status(timeout).result()
    except grpc.RpcError as e:
        return None, None, Why(NOT_USABLE, f"{DAEMON} (pid {info['pid']}) is not usable ({rpc_error(e)})")
    ok = reply.version == version()
    step("connect.3", d, daemon_pid=reply.pid, daemon_version=reply.version, ok=ok)
    if not ok:
        return None, None, Why(MISMATCH, f"{DAEMON} version mismatch (daemon {reply.version}, client {version()})")
    return conn, reply, None


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
    changed, inside = ", ".join(changes), buckd.runs_this_command(d)
    step("settings", d, daemon_pid=reply.pid, changes=changes, applied=not inside)
    if inside:
        return say(f"this command runs inside {DAEMON} (pid {reply.pid}): not changing {changed}")
    try:
        conn.stub.Configure(wanted, timeout=STATUS_TIMEOUT, metadata=conn.metadata)
    except grpc.RpcError as e:
        raise Fail(f"{DAEMON} (pid {reply.pid}): could not apply {changed} ({rpc_error(e)})") from None
    reply.settings.CopyFrom(wanted)
    say(f"{DAEMON} (pid {reply.pid}): {changed}, applied")


# "To start/restart the buckd process, the client does:"
def restart(d, isolation, seen, why):
    """Steps 1-6, unless once we hold the lock buckd no longer needs them. `seen`: the bytes of
    buckd.info that steps 1-3 failed on."""
    with LifecycleLock(d):                  # 1. lock "lifecycle.lock"; 6. release it on leaving
        wait_while_a_buckd_starts(d)
        if read_file(os.path.join(d, INFO_FILE), os.O_NOFOLLOW) != seen:
            return                          # another client restarted it meanwhile
        if answers_when_asked_again(d, seen, why):
            return                          # it was only us that were paused
        refuse_to_restart_here(d, why)
        why = report_crash(d, seen, why)    # said, and its logs kept in prev/
        say(f"{'starting' if why.outcome in (NO_DAEMON, CRASHED) else 'restarting'} {DAEMON}: {why.text}")
        kill_daemon(d, f"{DAEMON} was restarted by pid {os.getpid()}: {why.text}")   # 2-3. kill it
        start_daemon(d, isolation, why)     # 4-5. run `buck daemon`, wait until it serves


def wait_while_a_buckd_starts(d):
    """Wait (START_TIMEOUT at most from its start) for a buckd that holds buckd.pid but is not
    named in buckd.info yet: it is starting."""
    pid = buckd.holder(d)
    named = lambda: (buckd.read_info(d) or {}).get("pid") == pid
    try:
        age = time.time() - os.lstat(os.path.join(d, PID_FILE)).st_mtime
    except OSError:
        return
    if pid and 0 <= age < START_TIMEOUT and not named():
        poll(lambda: buckd.holder(d) != pid or named(), START_TIMEOUT - age)


def answers_when_asked_again(d, seen, why):
    """Ask a buckd that did not answer once more: maybe *we* were paused (Ctrl-Z, sleep)."""
    return why.outcome == NOT_USABLE and check_version(d, seen, RECHECK_TIMEOUT)[0] is not None


def refuse_to_restart_here(d, why):
    """Fail if our own files changed on disk, or if this command runs inside the buckd to kill."""
    if checksum() != version():
        raise Fail(f"{TOOL}'s files changed on disk since this command started (an upgrade?): "
                   "run it again; killing nothing")
    if buckd.runs_this_command(d):
        raise Fail(f"this command runs inside {DAEMON} (pid {buckd.holder(d)}), which it would have "
                   f"to restart ({why.text}): refusing to kill the {DAEMON} that runs it")


def report_crash(d, seen, why):
    """Why we start buckd, in full. If the buckd that buckd.info names is gone without a clean
    recorded end, it crashed: say so with its log, keep its logs in prev/, drop its buckd.info."""
    info = buckd.parse_info(seen)
    if info and buckd.holder(d) is None:
        end = buckd.end_record(d)
        if end.get("pid") != info["pid"] or end.get("how") in (None, "panic"):
            buckd.keep_logs(d)
            say(f"{DAEMON} crashed, see {buckd.crash_log(d, info['pid'])}")
            ended = buckd.how_it_ended(d, info["pid"]) or "no record"
            os.unlink(os.path.join(d, INFO_FILE))      # said once: the next client starts afresh
            return Why(CRASHED, f"{DAEMON} (pid {info['pid']}) crashed or vanished ({ended})")
    elif why.outcome != NO_DAEMON:
        return why
    last = buckd.how_it_ended(d, buckd.last_pid(d))     # (it may have ended just now: idle...)
    return Why(NO_DAEMON, f"no {DAEMON} was running" + (f" (the last one, {last})" if last else ""))


# Correctness 2, "Only a single client is killing/starting a buckd at a time": "When the client
# is killing or starting the buckd process, it will grab an exclusive lock on the
# "lifecycle.lock" file". A flock: the kernel releases it when its holder dies, however.
class LifecycleLock:
    """lifecycle.lock, open; `with` it: held (restart's steps 1 and 6). Its holder's words are in it."""

    def __init__(self, d):
        self.d, self.path = owned(d), os.path.join(d, LOCK_FILE)
        os.makedirs(d, exist_ok=True)
        self.fd = open_file(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):     # (a FIFO, a device: no lock to take)
            os.close(self.fd)
            raise OSError(0, "not a regular file", self.path)

    def take(self):
        """Take the lock if it is free; never wait."""
        import fcntl
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def holder_words(self):
        return printable(os.pread(self.fd, 200, 0).decode(errors="replace").strip())

    def __enter__(self):
        if not poll(self.take, LOCK_PATIENCE):
            say(f"waiting for another {TOOL} client to finish starting or killing {DAEMON}: {self.holder_words()}")
            if not poll(self.take, LOCK_TIMEOUT):
                whom = self.holder_words()
                os.close(self.fd)
                raise Fail(f"timed out after {LOCK_TIMEOUT:.0f} s waiting for {LOCK_FILE} (held by: {whom})")
        self.taken()
        return self

    def taken(self):
        """Write who holds it, for those who wait; log restart.1."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}: {command_line()}\n".encode(), 0)
        held_locks.add(self.d)      # first: a Ctrl-C from here on still logs restart.6
        step("restart.1", self.d)

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
    import signal
    running, calls = {}, {}
    for d in dirs:
        pid = running[d] = buckd.holder(d)
        step("restart.2", d, daemon_pid=pid, reason=reason)
        info = buckd.read_info(d)
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
        if d not in left and how[d] == "sigkill" and (buckd.read_info(d) or {}).get("pid") == pid:
            os.unlink(os.path.join(d, INFO_FILE))   # it could not remove its buckd.info: we do
        if d not in left:
            step("restart.3", d, daemon_pid=pid, how=how[d])
    killed = {d: running.get(d) for d in dirs if d not in left}
    return killed, {d: f"could not kill {DAEMON} (pid {running[d]})" for d in left}


def still_running(running):
    """The dirs of `running` ({dir: pid}) whose buckd still holds buckd.pid after EXIT_TIMEOUT."""
    left = lambda: [d for d, pid in running.items() if buckd.holder(d) == pid]
    poll(lambda: not left(), EXIT_TIMEOUT)
    return left()


def signal_buckd(d, pid, sig, reason):
    """Record who kills pid and why, then signal it, only if it holds buckd.pid's lock."""
    import signal
    if pid > 1 and pid != os.getpid() and buckd.holder(d) == pid:
        if buckd.end_record(d).get("how") in (None, "kill"):   # (unless buckd has said how it ends)
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
        raise Fail(f"{DAEMON} did not start within {START_TIMEOUT:.0f} s, see {buckd.crash_log(d, None)}")
    step("restart.4", d, exit=proc.returncode, why=why.text)
    if proc.returncode == 0:
        step("restart.5", d, daemon_pid=buckd.holder(d))
    elif proc.returncode > 0 and proc.returncode != EXIT_ALREADY_RUNNING:
        said = (err.decode(errors="replace").strip().splitlines() or ["no reason given"])[-1]
        raise Fail(f"{DAEMON} failed to start: {said.removeprefix(f'{TOOL}: ')}")


# --- "buck kill and other daemon restarts", and the commands that report daemons

def cmd_kill(isolation, options):
    """`buck kill`: steps 1-3 and 6 of "start/restart"; the user's word, even from inside buckd."""
    d = daemon_dir(isolation)
    with LifecycleLock(d):
        pid = kill_daemon(d, f"`{TOOL} kill` was invoked by pid {os.getpid()}")
    out(f"{DAEMON} killed (pid {pid})\n" if pid is not None else f"no {DAEMON} running\n")
    return 0


def cmd_killall(isolation, options):
    """`buck killall`: every buckd of yours, all at once, in about KILLALL_PATIENCE + KILL_TIMEOUT
    + 2 EXIT_TIMEOUT; never the buckd running us, nor one whose lifecycle.lock another client
    holds (it may be starting it). What it leaves, it names, and exits 1."""
    dirs, unread = buckd.all_daemon_dirs()
    left, locks = [(d, f"cannot read it: {why}") for d, why in unread], {}
    for d in dirs:
        try:
            if buckd.holder(d) is not None and not buckd.runs_this_command(d):
                locks[d] = LifecycleLock(d)
        except (Fail, OSError) as e:
            left.append((d, str(e)))
    poll(lambda: all([lock.take() for lock in locks.values()]), KILLALL_PATIENCE)
    for d, lock in list(locks.items()):
        if lock.take():
            lock.taken()
        else:
            left.append((d, f"another {TOOL} client holds its {LOCK_FILE}: {lock.holder_words()}"))
            os.close(locks.pop(d).fd)
    try:
        killed, failed = kill_daemons(list(locks), f"`{TOOL} killall` was invoked by pid {os.getpid()}")
    finally:
        for lock in locks.values():
            lock.__exit__()
    for d, pid in killed.items():
        if pid is not None:
            out(f"{DAEMON} killed (pid {pid}) in {printable(d)}\n")
    for d, why in left + list(failed.items()):
        say(f"{printable(d)}: {why}, left as it is")
    return EXIT_FAILED if left or failed else 0


def cmd_server(isolation, options):
    conn, reply = next(connect(owned(daemon_dir(isolation)), isolation))
    return print_status([status_fields(reply)], options)


def cmd_status(isolation, options):
    """Report buckd (--all: every one, asked at once), whatever its version; start none."""
    every = "all" in options
    dirs, unread = buckd.all_daemon_dirs() if every else ([daemon_dir(isolation)], [])
    asked = [(d, *ask_status(d)) for d in dirs]
    rows = [status_row(*row, patience=0 if every else EXIT_TIMEOUT) for row in asked]
    if not every and rows[0]["state"] not in ("running", "dead", "none"):
        raise Fail(f"{DAEMON} (pid {rows[0]['pid']}) is {rows[0]['state']}")
    print_status([row for row in rows if row["state"] != "none" or not every], options, every)
    for d, why in unread:
        say(f"{printable(d)}: cannot read it: {why}")
    return EXIT_FAILED if unread else 0


def ask_status(d):
    pid, info = buckd.holder(d), buckd.read_info(d)
    return pid, info, Connection(info).status() if info and info["pid"] == pid else None


def status_row(d, pid, info, call, patience):
    """d as `status` shows it: running, not responding, starting, dead or none."""
    if call:
        try:
            return status_fields(call.result())
        except grpc.RpcError as e:
            exiting = e.code() == grpc.StatusCode.UNAVAILABLE
            if not exiting or not poll(lambda: buckd.holder(d) != pid, patience):
                return {"daemon_dir": d, "pid": pid, "state": f"not responding: {rpc_error(e)}"}
            pid = None              # it was shutting down, and now it is gone
    if pid is not None:
        return {"daemon_dir": d, "pid": pid, "state": f"starting, not named in {INFO_FILE} yet"}
    last = buckd.last_pid(d)
    return {"daemon_dir": d, "pid": info["pid"] if info else last, "state": "dead" if info else "none",
            "previous_end": buckd.how_it_ended(d, last) or ""}


def status_fields(reply):
    """A Status reply as `status --json` shows it: numbers stay numbers."""
    fields = {n: getattr(reply, n) for n in reply.DESCRIPTOR.fields_by_name
              if n not in ("figures", "settings", "commands")}
    fields["check_interval_s"] = reply.settings.check_interval_s
    fields["idle_timeout_s"] = reply.settings.idle_timeout_s
    fields["commands"] = [{"args": list(c.argv), "client_pid": c.client_pid, "running_s": c.running_s}
                          for c in reply.commands]
    return {"state": "running", **fields, **dict(reply.figures)}


def print_status(rows, options, every=False):
    import json
    if "json" in options:
        out(json.dumps(rows if every else rows[0]) + "\n")
    elif every:
        out("".join(status_line(row) + "\n" for row in rows) or f"no {DAEMON} running\n")
    elif rows[0]["state"] == "running":
        row = rows[0]
        shown = [f"\n  {key.removesuffix('_s').removesuffix('_bytes')}: {for_people(key, value)}"
                 for key, value in row.items() if key not in ("state", "uptime_s", "idle_s")]
        header = f"{DAEMON} is running, up {duration(row['uptime_s'])}, idle {duration(row['idle_s'])}"
        out(header + "".join(shown) + "\n")
    else:
        end = rows[0]["previous_end"]
        out(f"no {DAEMON} running\n" + (f"the last one, {end}\n" if end else ""))
    return 0


def for_people(key, value):
    """A status field as a person reads it: "3 min", local times, MiB, commands a line each."""
    if key == "start_time":
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if key == "idle_timeout_s" and not value:
        return "never"
    if key == "cpu_s":
        return f"{value:.2f} s"
    if key.endswith("_s"):
        return duration(value)
    if key.endswith("_bytes"):
        return f"{value / 2**20:.1f} MiB"
    if key == "commands":
        return "".join(f"\n    pid {c['client_pid']}, for {duration(c['running_s'])}: "
                       f"{TOOL} {printable(' '.join(c['args']))}" for c in value) or "none"
    return value


def duration(seconds):
    """Seconds as people say them: 0.2 s, 9 s, 3 min, 5 h, 2 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.2g} s"


def status_line(row):
    """A line of `status --all`."""
    if row["state"] != "running":
        return f"{printable(row['daemon_dir'])}: {row['state']} (pid {row['pid']})"
    running = "".join(f"; pid {c['client_pid']} runs {TOOL} {printable(' '.join(c['args']))}" for c in row["commands"])
    return (f"{printable(row['daemon_dir'])}: pid {row['pid']}, version {row['version']}, "
            f"up {duration(row['uptime_s'])}, {row['active_commands']} running, idle {duration(row['idle_s'])}, "
            f"started because: {row['started_because']}{running}")


def run_command(d, isolation, name, operands, options):
    """Send a command to a buckd whose version we checked; resend only until one accepts it."""
    import queue
    import threading
    load_grpc()
    refusals = {grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE, grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_FAILED}
    request = pb.CommandRequest(name=name, args=[os.fsencode(a) for a in operands], options=options,
                                cwd=os.fsencode(os.getcwd()), client_pid=os.getpid(),
                                argv=[os.fsencode(word) for word in sys.argv[1:]])
    for conn, reply in connect(d, isolation):       # (each a new connection: see ATTEMPTS)
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
    step("command", d, daemon_pid=reply.pid, name=name)
    return show_events(d, reply.pid, events)


def show_events(d, pid, events):
    """Write a running command's output as it comes; its exit code, or fail saying why it ended."""
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
    raise Fail(f"lost {DAEMON} (pid {pid}) during the command ({rpc_error(event)}); "
               f"it crashed or was killed, see {buckd.crash_log(d, pid)}")


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
    """`python buck.py ...`, and a vendored launcher: run main, exit with its code."""
    try:
        code = main(sys.argv[1:])
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    os._exit(code)                  # skip interpreter teardown: grpc's threads make it slow


if __name__ == "__main__":
    entry()
