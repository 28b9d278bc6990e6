# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""What a reader of buckd's lifecycle (buck.py, buckd.py) can skip: the command table and its
arguments; a command's trip (buckd runs it, the client shows its events); `status` and `server`
as people read them; `killall` and `status --all`, over every daemon dir; the hidden `debug`
commands of the lifecycle tests. docs/design.md, "The lifecycle apart, and fast", says which
two of the lifecycle's rules ride on a command's trip and live here."""
import os, sys, time

import buck
import workload
from buck import (DAEMON, DEFAULT_ISOLATION, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, INFO_FILE,
                  KILLALL_PATIENCE, MAX_SECONDS, PID_FILE, STATUS_TIMEOUT, TOOL, Fail,
                  out, poll, printable, say, seconds, to_stderr)

# --- The command line: its commands, their arguments, the usage

COMMANDS = {            # name: (usage, help); no help: hidden. Then workload's and the debug ones.
    "help": ("", "show this message"),
    "version": ("", "print this client's version"),
    "status": ("[--json] [--all]", f"report the running {DAEMON} (--all: every one of yours)"),
    "server": ("[--json]", f"make sure the {DAEMON} of this version runs, then report it"),
    "kill": ("", f"stop the running {DAEMON}"),
    "killall": ("", f"stop every {DAEMON} of yours, in every repository"),
    "daemon": ("", None),
}
USAGE_LINE = f"{TOOL} [--isolation-dir NAME] COMMAND ..."


def table():
    """name -> (usage, help): every command the client knows."""
    return {**COMMANDS, **{name: entry[:2] for name, entry in workload_commands().items()}}


def local_command(name):
    """The client's own commands, which run no Command in buckd: the function of one, or None."""
    import buckd
    return {"status": cmd_status, "server": cmd_server, "kill": buckd.cmd_kill,
            "killall": cmd_killall}.get(name)


def workload_commands():
    """name -> (usage, help, handler): the team's commands, and upstream's `debug` hooks."""
    return {**workload.COMMANDS, **DEBUG_COMMANDS}


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
    known = [name for name in table() if argv[:len(name.split())] == name.split()]
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
    spec = table()[name][0].split()
    return {w.strip("[]").split("=")[0]: "=" in w for w in spec if w.startswith("[--")}


def check_usage(name, operands, options):
    """Fail unless operands and options fit the usage: the client checks, and buckd again."""
    unknown = sorted(set(options) - {key[2:] for key in options_of(name)})
    if unknown:
        raise Fail(f"unknown option --{printable(unknown[0])}", EXIT_USAGE)
    slots = [w for w in table()[name][0].split() if not w.startswith("[--")]
    least = sum(not w.startswith("[") for w in slots)
    most = float("inf") if any(w.rstrip("]").endswith("...") for w in slots) else len(slots)
    if len(operands) < least:
        raise Fail("missing operand(s)", EXIT_USAGE)
    if len(operands) > most:
        raise Fail("extra operand(s)", EXIT_USAGE)


def usage_error(name, message):
    return f"{name}: {message} (usage: {' '.join([TOOL, name, table()[name][0]]).strip()})"


def usage():
    listed = [(f"{name} {args}".strip(), text) for name, (args, text) in table().items() if text]
    width = max(len(left) for left, _ in listed) + 2
    lines = "".join(f"  {left:<{width}}{text}\n" for left, text in listed)
    return (f"usage: {USAGE_LINE}\n\ncommands:\n{lines}\noptions:\n  --isolation-dir NAME  "
            f"use a separate {DAEMON} (default {DEFAULT_ISOLATION}), with its own daemon dir\n")


# --- A command's trip: buckd runs it (a thread each), the client shows its events

def malformed(request):
    """What is wrong with a Command request that no handler should see, or None."""
    if request is None:
        return "no command was sent"
    if request.name not in workload_commands():
        return f"no command {printable(request.name)}"
    if not os.path.isabs(request.cwd):
        return f"cwd must be an absolute path, not {printable(request.cwd)}"
    if any(b"\0" in arg for arg in [request.cwd, *request.args]):
        return "a path with a NUL byte"
    return None


def run_workload(request, stop, pid_stat):
    """Run a workload command: its events as CommandEvents, then its exit code."""
    from buckd import pb
    from functools import partial
    from types import SimpleNamespace
    call = SimpleNamespace(args=list(request.args), options=dict(request.options), cwd=request.cwd,
                           stop=stop, open=partial(buck.open_file, refuse=pid_stat))
    try:
        check_usage(request.name, call.args, call.options)
        events = workload_commands()[request.name][2](call)
        while True:
            try:
                kind, data = next(events)
            except StopIteration as end:
                return end.value
            yield pb.CommandEvent(**{kind: data})
    except Fail as e:                      # said as the client says its own
        message = usage_error(request.name, e) if e.code == EXIT_USAGE else e
        yield pb.CommandEvent(stderr=f"{TOOL}: {message}\n".encode(errors="backslashreplace"))
        return e.code


def serve_command(requests, context, running, stop, api):
    """buckd's side of a Command stream (daemon.proto): the request, checked; "accepted"; the
    client's go-ahead; the command's events; its exit code, or why buckd stopped it."""
    from buckd import grpc, pb
    request = running[0] = next(requests, None)
    if problem := malformed(request):
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(problem)
        return
    yield pb.CommandEvent(accepted=True)
    if next(requests, None) is None:        # no go-ahead: the client has gone
        return
    code = yield from run_workload(request, stop, api.pid_stat)
    if code is not None:                    # it ran to its end
        yield pb.CommandEvent(exit_code=code)
    elif api.reason:                        # it was stopped by the shutdown
        yield pb.CommandEvent(shutdown=api.reason)


def send(conn, request):
    """The client's side: the command's events (a queue) once buckd has accepted it, and given
    the go-ahead; None if buckd went away first: it ran nothing, the caller may send it again."""
    import queue, threading
    from buckd import grpc, pb
    refusals = {grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
                grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_FAILED}
    accepted, events = threading.Event(), queue.Queue()
    stream = conn.stub.Command(handshake(request, accepted), metadata=conn.metadata)
    threading.Thread(target=read_stream, args=(stream, events), daemon=True).start()
    try:
        event = events.get(timeout=STATUS_TIMEOUT)  # as for Status: else buckd is not usable
    except queue.Empty:
        event = None
    if isinstance(event, pb.CommandEvent) and event.HasField("accepted"):
        accepted.set()              # the go-ahead
        return events
    stream.cancel()                 # buckd went away before it accepted: it ran nothing
    if isinstance(event, grpc.Call) and event.code() in refusals:
        raise Fail(f"{DAEMON} refused the command: {event.details()}", refusals[event.code()])
    return None


def handshake(request, accepted):
    """Our side of a Command stream: the command, then the go-ahead once it is accepted."""
    from buckd import pb
    yield request
    accepted.wait()
    yield pb.CommandRequest()


def read_stream(stream, events):
    """Queue a stream's events, then None or its error (the reader waits with a timeout)."""
    from buckd import grpc
    try:
        for event in stream:
            events.put(event)
        events.put(None)
    except grpc.RpcError as e:
        events.put(e)


def show_events(d, pid, events):
    """Write a running command's output as it comes; its exit code, or fail saying why it ended."""
    from buckd import crash_log, pb, rpc_error
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
               f"it crashed or was killed, see {crash_log(d, pid)}")


# --- `status`: what a buckd does, as people read it (--json keeps the numbers)

def cmd_status(isolation, options):
    """`buck status`: report buckd (--all: every one, asked at once), whatever its version;
    start none. Its states are the lifecycle's, as buckd.py's files and calls tell them."""
    every = "all" in options
    dirs, unread = all_daemon_dirs() if every else ([buck.daemon_dir(isolation)], [])
    asked = [(d, *ask_status(d)) for d in dirs]
    rows = [status_row(*row, patience=0 if every else EXIT_TIMEOUT) for row in asked]
    if not every and rows[0]["state"] not in ("running", "dead", "none"):
        raise Fail(f"{DAEMON} (pid {rows[0]['pid']}) is {rows[0]['state']}")
    print_status([row for row in rows if row["state"] != "none" or not every], options, every)
    for d, why in unread:
        say(f"{printable(d)}: cannot read it: {why}")
    return EXIT_FAILED if unread else 0


def ask_status(d):
    from buckd import Connection, holder, read_info
    pid, info = holder(d), read_info(d)
    return pid, info, Connection(info).status() if info and info["pid"] == pid else None


def cmd_server(isolation, options):
    """`buck server`: make sure the buckd of this version runs ("client connection"), report it."""
    from buckd import connect
    conn, reply = next(connect(buck.owned(buck.daemon_dir(isolation)), isolation))
    return print_status([status_fields(reply)], options)


def status_row(d, pid, info, call, patience):
    """d as `status` shows it: running, not responding, shutting down, starting, dead or none."""
    from buckd import grpc, holder, how_it_ended, last_pid, read_info, rpc_error
    if call:
        try:
            return status_fields(call.result())
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:     # (a wedged buckd still accepts)
                return {"daemon_dir": d, "pid": pid, "state": f"not responding: {rpc_error(e)}"}
            if not poll(lambda: holder(d) != pid, patience):
                return {"daemon_dir": d, "pid": pid, "state": f"shutting down ({rpc_error(e)})"}
            pid, info = None, read_info(d)      # it was shutting down, and now it is gone
    if pid is not None:
        return {"daemon_dir": d, "pid": pid, "state": f"starting, not named in {INFO_FILE} yet"}
    last = last_pid(d)
    return {"daemon_dir": d, "pid": info["pid"] if info else last,
            "state": "dead" if info else "none", "previous_end": how_it_ended(d, last) or ""}


def running(request, running_s):
    """A running command as Status shows it: its client's words (bad bytes escaped), pid, time."""
    from buckd import pb
    words = [word.decode(errors="backslashreplace") for word in request.argv]
    return pb.RunningCommand(argv=words, client_pid=request.client_pid, running_s=running_s)


def status_fields(reply):
    """A Status reply as `status --json` shows it: numbers stay numbers."""
    fields = {n: getattr(reply, n) for n in reply.DESCRIPTOR.fields_by_name
              if n not in ("figures", "settings", "commands")}
    fields["check_interval_s"] = reply.settings.check_interval_s
    fields["idle_timeout_s"] = reply.settings.idle_timeout_s
    fields["commands"] = [{"args": list(c.argv), "client_pid": c.client_pid,
                           "running_s": c.running_s} for c in reply.commands]
    return {"state": "running", **fields, **dict(reply.figures)}


def resource_usage():
    """buckd's memory (RSS now and at peak) and CPU time, as buck2's `status --snapshot`."""
    import resource
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)     # (bytes on macOS)
    statm = (buck.read_file("/proc/self/statm") or b"0 0").split()
    rss = int(statm[1]) * os.sysconf("SC_PAGE_SIZE") or peak
    cpu = usage.ru_utime + usage.ru_stime
    return {"rss_bytes": rss, "peak_rss_bytes": max(peak, rss), "cpu_s": cpu}


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
        up, idle = duration(row["uptime_s"]), duration(row["idle_s"])
        header = f"{DAEMON} is running, up {up}, idle {idle}"
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
        lines = [f"pid {c['client_pid']}, for {duration(c['running_s'])}: "
                 f"{TOOL} {printable(' '.join(c['args']))}" for c in value]
        return f"{len(value)}" + "".join(f"\n    {line}" for line in lines)
    return value


def duration(s):
    """Seconds as people say them: 0.2 s, 9 s, 3 min, 5 h, 2 days."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if s >= 2 * size:
            return f"{s / size:.0f} {unit}"
    return f"{s:.2g} s"


def status_line(row):
    """A line of `status --all`."""
    if row["state"] != "running":
        return f"{printable(row['daemon_dir'])}: {row['state']} (pid {row['pid']})"
    running = "".join(f"; pid {c['client_pid']} runs {TOOL} {printable(' '.join(c['args']))}"
                      for c in row["commands"])
    return (f"{printable(row['daemon_dir'])}: pid {row['pid']}, version {row['version']}, "
            f"up {duration(row['uptime_s'])}, {row['active_commands']} running, "
            f"idle {duration(row['idle_s'])}, "
            f"started because: {row['started_because']}{running}")


# --- Every buckd of yours: their daemon dirs, for `status --all` and `killall`

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


def cmd_killall(isolation, options):
    """`buck killall`: every buckd of yours, all at once, in about KILLALL_PATIENCE + KILL_TIMEOUT
    + 2 EXIT_TIMEOUT; never the buckd running us, nor one whose lifecycle.lock another client
    holds (it may be starting it). What it leaves, it names, and exits 1."""
    from contextlib import ExitStack
    from buckd import LifecycleLock, holder, kill_daemons, runs_this_command
    dirs, unread = all_daemon_dirs()
    left, locks, locked = [(d, f"cannot read it: {why}") for d, why in unread], {}, []
    until = time.monotonic() + KILLALL_PATIENCE     # every lock, tried together until then
    for d in dirs:
        try:
            if holder(d) is not None and not runs_this_command(d):
                locks[d] = LifecycleLock(d, until)
        except (Fail, OSError) as e:
            left.append((d, getattr(e, "strerror", None) or str(e)))
    poll(lambda: all([lock.take() for lock in locks.values()]), until - time.monotonic())
    with ExitStack() as held:
        for d, lock in locks.items():
            try:
                held.enter_context(lock)    # taken above (again: the same fd), or one last try
                locked.append(d)
            except (Fail, OSError) as e:
                left.append((d, getattr(e, "strerror", None) or str(e)))
        why = f"`{TOOL} killall` was invoked by pid {os.getpid()}"
        killed, failed = kill_daemons(locked, why)
    for d, pid in killed.items():
        if pid is not None:
            out(f"{DAEMON} killed (pid {pid}) in {printable(d)}\n")
    for d, why in left + list(failed.items()):
        say(f"{printable(d)}: {why}, left as it is")
    return EXIT_FAILED if left or failed else 0


# --- The hidden `debug` commands, which the lifecycle tests run in buckd

def cmd_debug_sleep(call):
    """`buck debug sleep SECONDS`: one line, then a sleep that ends early if stopped."""
    wait = seconds(os.fsdecode(call.args[0]), "SECONDS", 0, MAX_SECONDS)
    done = time.monotonic() + wait
    yield "stdout", b"sleeping for %g s\n" % wait
    call.stop.wait(done - time.monotonic())
    return 0 if time.monotonic() >= done else None


def cmd_debug_crash(call):
    """`buck debug crash`: a simulated bug in a command, hence a panic."""
    raise RuntimeError(f"`{TOOL} debug crash` was invoked")
    yield                           # (a generator, like every command)


DEBUG_COMMANDS = {
    "debug sleep": ("SECONDS", None, cmd_debug_sleep),
    "debug crash": ("", None, cmd_debug_crash),
}
