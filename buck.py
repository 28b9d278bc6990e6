#!/usr/bin/env python3
"""buck: the client of buckd, the buck daemon. The spec is ../shared/design/buckd.md.

`help`, `version` and argument errors are answered here without grpc. Every other command
finds the daemon dir of this repository, connects to a buckd of this client's version
(starting or restarting it as "client connection and buckd startup" says) and asks it.

Modules that take milliseconds to import (argparse, json, signal, subprocess, threading,
grpc) are imported where they are needed: `help` and `version` start as fast as Python.
"""
import fcntl
import os
import sys
import time
import zlib

USAGE_LINE = "buck [--isolation-dir NAME] COMMAND ..."
USAGE = f"""\
usage: {USAGE_LINE}

commands:
  help             show this message
  version          print this client's version
  status [--json]  report the running buckd; never starts one
  server [--json]  make sure a buckd of this version runs, then report it
  kill             stop the running buckd
  hash PATH...     print SHA-256 digests as sha256sum does, computed and cached by buckd

options:
  --isolation-dir NAME  use a separate buckd (default v2), with its own daemon dir
"""
HERE = os.path.dirname(os.path.abspath(__file__))
PID, INFO, LOCK = "buckd.pid", "buckd.info", "lifecycle.lock"
STATUS_TIMEOUT = 5.0    # a buckd that does not answer Status by then is not usable
KILL_TIMEOUT = 2.0      # for the Kill call itself
EXIT_TIMEOUT = 5.0      # for buckd to exit once told to (then SIGKILL), and again after SIGKILL
START_TIMEOUT = 30.0    # for `buck daemon` to report that buckd serves
LOCK_TIMEOUT = 60.0     # for another client to finish starting or killing buckd
ATTEMPTS = 4            # restarts and re-connects before we give up on a fight over buckd
grpc = pb = pb_grpc = None  # imported by load_grpc(), only by commands that talk to buckd


class Fail(Exception):
    """A failure to report on stderr as `buck: <message>` (exit 1), never as a traceback."""


def say(message):
    print(f"buck: {message}", file=sys.stderr, flush=True)


def version(_memo=[]):
    """This client's version: a checksum of the code, so every edit is a new buck build.
    (crc32: zlib imports in 0.1 ms, hashlib in 6; a version needs no cryptography.)
    Read once per process: the code this process runs does not change under it."""
    if not _memo:
        crc = 0
        for name in ("buck.py", "buckd.py", "daemon.proto"):
            with open(os.path.join(HERE, name), "rb") as f:
                crc = zlib.crc32(f.read(), crc)
        _memo.append(f"{crc:08x}")
    return _memo[0]


def poll(condition, timeout, interval=0.005):
    """Wait until condition() is true; False if it still is not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# --- The daemon directory: "a directory in $HOME/.buck specific to that repository+output
# directory" (daemon process flow).

def daemon_dir(isolation):
    """$HOME/.buck/buckd/<repo root without its leading />/<isolation dir>."""
    home = os.environ.get("HOME")
    if not home:
        raise Fail("HOME is not set: buckd keeps its files in $HOME/.buck")
    cwd = root = os.getcwd()
    while not os.path.isfile(os.path.join(root, ".buckconfig")):
        if root == os.path.dirname(root):
            raise Fail(f"not in a buck repository: no .buckconfig in {cwd} or its parents")
        root = os.path.dirname(root)
    return os.path.join(os.path.abspath(home), ".buck", "buckd", root.lstrip("/"), isolation)


def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def parse_info(raw):
    """buckd.info as a dict, or None if it is not a complete one (corrupt, truncated)."""
    import json
    try:
        info = json.loads(raw)
        if (isinstance(info["pid"], int) and isinstance(info["port"], int)
                and isinstance(info["version"], str) and isinstance(info["auth_token"], str)):
            return info
    except (ValueError, TypeError, KeyError):
        pass
    return None


def try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def daemon_pid(d):
    """The pid of the running buckd: whoever holds the lock on buckd.pid, else None.
    Only such a pid is safe to signal: a stale buckd.pid may name a reused pid."""
    try:
        fd = os.open(os.path.join(d, PID), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if try_lock(fd):
            return None             # nobody holds it: no buckd (closing fd unlocks)
        text = b""
        def written():              # buckd writes its pid right after taking the lock
            nonlocal text
            text = os.pread(fd, 32, 0).strip()
            return text
        poll(written, 1.0)
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)


# --- "client connection and buckd startup"

def load_grpc():
    """Import grpc and the stubs (~250 ms): only the commands that talk to buckd pay it."""
    global grpc, pb, pb_grpc
    if grpc is None:
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        try:
            import grpc as grpc_module, daemon_pb2, daemon_pb2_grpc
        except ImportError as e:
            raise Fail(f"{e}: run `make setup`, then use .venv/bin/python (see README.md)")
        grpc, pb, pb_grpc = grpc_module, daemon_pb2, daemon_pb2_grpc


class Connection:
    """A channel to the one buckd named by a buckd.info. Its auth token, sent with every
    call, is also its identity: a buckd started later on the same port rejects it."""

    def __init__(self, info):
        load_grpc()
        self.info = info
        self.channel = grpc.insecure_channel(f"127.0.0.1:{info['port']}",
                                             options=[("grpc.enable_http_proxy", 0)])
        self.stub = pb_grpc.DaemonApiStub(self.channel)
        self.metadata = (("buckd-token", info["auth_token"]),)

    def status(self):
        return self.stub.Status(pb.StatusRequest(), timeout=STATUS_TIMEOUT, metadata=self.metadata)

    def kill(self, reason):
        self.stub.Kill(pb.KillRequest(reason=reason), timeout=KILL_TIMEOUT, metadata=self.metadata)

    def command(self, request):
        return self.stub.Command(request, metadata=self.metadata)


def rpc_error(e):
    return f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e)


def try_connect(raw):
    """Steps 1-3 of "client connection": read buckd.info, connect, check the version.
    Returns (connection, None), or (None, what is wrong) when buckd must be (re)started."""
    if raw is None:
        return None, "starting buckd"
    info = parse_info(raw)
    if info is None:
        return None, "buckd.info is corrupt: starting buckd"
    conn = Connection(info)
    try:
        conn.reply = conn.status()
    except grpc.RpcError as e:
        return None, f"buckd (pid {info['pid']}) is not usable ({rpc_error(e)}): restarting"
    if conn.reply.version != version():
        return None, (f"buckd version mismatch (daemon {conn.reply.version}, "
                      f"client {version()}): restarting")
    return conn, None


def connect(d, isolation):
    """A Connection to a buckd of this client's version, (re)starting buckd if need be."""
    for _ in range(ATTEMPTS):
        raw = read_file(os.path.join(d, INFO))
        conn, problem = try_connect(raw)
        if conn:
            return conn
        with lifecycle_lock(d):
            if read_file(os.path.join(d, INFO)) != raw:
                continue            # another client (re)started buckd meanwhile: try that one
            info = parse_info(raw) if raw else None
            if info and daemon_pid(d) is None:   # it left its files behind: it died
                say(f"buckd crashed, see {tail(d)}")
                problem = "starting buckd"
            say(problem)
            kill_daemon(d, f"buckd was restarted by pid {os.getpid()} (client version {version()})")
            start_daemon(d, isolation)
    raise Fail(f"gave up after {ATTEMPTS} attempts: buckd keeps being replaced "
               "(is a client of another version running?)")


def tail(d, lines=20):
    """'<d>/buckd.stderr' and its last lines, for reports of a daemon that died."""
    path = os.path.join(d, "buckd.stderr")
    text = (read_file(path) or b"")[-8192:].decode(errors="replace").splitlines()[-lines:]
    return path + "".join(f"\n  | {line}" for line in text)


# "When the client is killing or starting the buckd process, it will grab an exclusive lock
# on the "lifecycle.lock" file in the daemon directory."
class lifecycle_lock:
    """Held while this client kills or starts buckd. A waiting client says whom it waits for:
    the holder writes its pid and command into the file."""

    def __init__(self, d):
        os.makedirs(d, 0o700, exist_ok=True)
        self.fd = os.open(os.path.join(d, LOCK), os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        locked = lambda: try_lock(self.fd)
        if not poll(locked, 1.0, 0.002):
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "?"
            say(f"waiting for another buck client to finish starting or killing buckd: {holder}")
            if not poll(locked, LOCK_TIMEOUT, 0.01):
                os.close(self.fd)
                raise Fail(f"timed out after {LOCK_TIMEOUT:.0f} s waiting for lifecycle.lock "
                           f"(held by: {holder})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)

    def __exit__(self, *exc):
        os.close(self.fd)           # closing the file releases the flock


def kill_daemon(d, reason):
    """Steps 2-3 of "start/restart": send buckd a kill, then make sure, by pid, that it has
    exited (SIGKILL as the last resort). Returns the pid it killed, or None."""
    import signal
    pid = daemon_pid(d)
    if pid is None:
        return None
    info = parse_info(read_file(os.path.join(d, INFO)) or b"")
    if info and info["pid"] == pid:
        try:
            Connection(info).kill(reason)
        except grpc.RpcError:
            pass                    # wedged, or gone already: the pid checks below decide
    else:
        signal_if_still(d, pid, signal.SIGTERM)     # no buckd.info to call: SIGTERM asks the same
    gone = lambda: daemon_pid(d) != pid
    if not poll(gone, EXIT_TIMEOUT):
        signal_if_still(d, pid, signal.SIGKILL)
        if not poll(gone, EXIT_TIMEOUT):
            raise Fail(f"could not kill buckd (pid {pid})")
    return pid


def signal_if_still(d, pid, sig):
    """Signal pid only while it provably is buckd: it still holds the buckd.pid lock."""
    try:
        if daemon_pid(d) == pid:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass                        # it has just exited


def start_daemon(d, isolation):
    """Steps 4-5 of "start/restart": run `buck daemon`, which returns once buckd serves."""
    import subprocess
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "buck.py"),
                             "--isolation-dir", isolation, "daemon"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    load_grpc()                     # our own grpc import overlaps the daemon's boot
    try:
        _, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        kill_daemon(d, "it did not start in time")
        raise Fail(f"buckd did not start within {START_TIMEOUT:.0f} s, see {tail(d)}")
    if proc.returncode == 3:
        return                      # a buckd started behind our back (an orphaned start, or
                                    # `buck daemon` by hand): the connect loop uses or replaces it
    if proc.returncode != 0:
        raise Fail(f"buckd failed to start: {err.decode(errors='replace').strip()}")


# --- Commands

def cmd_status(d, args):
    """Report the running buckd, whatever its version; never start one."""
    info = parse_info(read_file(os.path.join(d, INFO)) or b"")
    if info is None:
        print("no buckd running")
        return 0
    try:
        reply = Connection(info).status()
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise Fail(f"buckd (pid {info['pid']}) is not responding: {rpc_error(e)}")
        print("no buckd running")   # a stale buckd.info: its daemon is gone
        return 0
    print_status(reply, args.json)
    return 0


def cmd_server(d, args):
    """Make sure a buckd of this client's version runs, then report it."""
    print_status(connect(d, args.isolation_dir).reply, args.json)
    return 0


def print_status(reply, as_json):
    fields = {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}
    if as_json:
        import json
        print(json.dumps(fields))
    else:
        print("buckd is running\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()), end="")


def cmd_kill(d, args):
    """`buck kill`: the doc's kill flow, under lifecycle.lock."""
    with lifecycle_lock(d):
        pid = kill_daemon(d, f"`buck kill` was invoked by pid {os.getpid()}")
    print(f"buckd killed (pid {pid})" if pid else "no buckd running")
    return 0


def run_command(d, args):
    """A command that runs in buckd: its output is streamed here as it is produced.
    Until buckd accepts the command we may reconnect and resend; after that, never."""
    import threading
    load_grpc()
    request = pb.CommandRequest(name=args.command + (f"-{args.debug}" if args.command == "debug" else ""),
                                args=[os.fsencode(str(a)) for a in args.operands],
                                cwd=os.fsencode(os.getcwd()))
    for _ in range(ATTEMPTS):
        conn = connect(d, args.isolation_dir)
        accepted = threading.Event()
        stream = conn.command(handshake(request, accepted))
        try:
            if next(stream).HasField("accepted"):
                accepted.set()      # the go-ahead: from here on, never resend
                break
        except grpc.RpcError:
            stream.cancel()         # buckd went away before it accepted: it ran nothing
    else:
        raise Fail("buckd did not accept the command")
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind in ("stdout", "stderr"):
                out = sys.stdout if kind == "stdout" else sys.stderr
                out.buffer.write(getattr(event, kind))
                out.flush()
            elif kind == "exit_code":
                return event.exit_code
            elif kind == "shutdown":
                raise Fail(f"buckd shut down during the command: {event.shutdown}")
        raise Fail("buckd ended the command without an exit code")
    except grpc.RpcError as e:
        raise Fail(f"lost buckd (pid {conn.info['pid']}) during the command ({rpc_error(e)}); "
                   f"it crashed or was killed, see {tail(d)}")
    except KeyboardInterrupt:
        stream.cancel()             # buckd stops the command; it keeps running
        return 130


def handshake(request, accepted):
    """The client's messages on a Command stream: the command, then, once buckd has
    accepted it, the empty go-ahead that lets buckd run it."""
    yield request
    accepted.wait()
    yield pb.CommandRequest()


def parse(argv):
    import argparse
    parser = argparse.ArgumentParser(prog="buck", usage=USAGE_LINE, add_help=False)
    parser.add_argument("--isolation-dir", default="v2", type=isolation_name)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("help", "version", "kill"):
        commands.add_parser(name)
    for name in ("status", "server"):
        commands.add_parser(name).add_argument("--json", action="store_true")
    commands.add_parser("hash").add_argument("operands", nargs="+", metavar="PATH")
    commands.add_parser("daemon").add_argument("--foreground", action="store_true")
    debug = commands.add_parser("debug").add_subparsers(dest="debug", required=True)
    debug.add_parser("sleep").add_argument("operands", nargs=1, type=float, metavar="SECONDS")
    debug.add_parser("crash").set_defaults(operands=[])
    return parser.parse_args(argv)


def isolation_name(name):
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(name)
    return name


def main(argv):
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)   # fast: no argparse
        return 0 if argv else 2
    if argv == ["version"]:
        print(f"buck {version()}")
        return 0
    args = parse(argv)              # argument errors: usage on stderr, exit 2
    try:
        if args.command in ("help", "version"):
            return main([args.command])
        d = daemon_dir(args.isolation_dir)
        if args.command == "daemon":
            import buckd
            return buckd.main(d, version(), args.foreground)
        import signal
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)   # `buck hash | head` ends quietly
        commands = {"status": cmd_status, "server": cmd_server, "kill": cmd_kill}
        return commands.get(args.command, run_command)(d, args)
    except Fail as e:
        say(e)
    except OSError as e:
        say(f"{e.filename}: {e.strerror}" if e.filename else e)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)                  # skip interpreter teardown: grpc's threads make it slow
