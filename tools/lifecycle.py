# SPDX-License-Identifier: MIT OR Apache-2.0. Upstream file of buckd: replace it on upgrade, never edit it.
"""lifecycle: check and draw the buckd lifecycle log, the evidence for the design doc's
three guarantees (buck2's daemon_lifecycle.md, "correctness"). A development tool, vendored
because test_buckd.py imports it; not part of buck.

With BUCK_LIFECYCLE_LOG=PATH every buck client and every buckd appends to PATH one JSON
object per step of the doc it takes, each line one O_APPEND write(): the file's order is
the order of the steps. Every line has t, pid, role ("client" or "daemon"), version (the
process's own), dir (the daemon dir), step, and the step's fields:

  client  connect.1 read buckd.info (found); connect.3 checked the version (daemon_pid,
          daemon_version, ok); restart.1 took lifecycle.lock; restart.2 sent a kill
          (daemon_pid); restart.3 the old buckd is gone (daemon_pid, how); restart.4 ran
          `buck daemon` (exit); restart.5 buckd ready (daemon_pid); restart.6 releasing
          lifecycle.lock; command: buckd accepted a command (daemon_pid, name)
  daemon  daemon.locked took buckd.pid; daemon.serving wrote buckd.info (port);
          daemon.shutdown (reason, path); daemon.exit its last line, still holding buckd.pid

A lock is held over a section of the log: lifecycle.lock from a client's restart.1 to its
restart.6, buckd.pid from a buckd's daemon.locked to its daemon.exit. check() proves that
the sections of one dir never interleave (guarantees 1 and 2) and that every command
follows its own client's accepting connect.3 of that buckd, of its version (guarantee 3).
lanes() draws the log, a row per line and a column per process; its legend says how.

    python tools/lifecycle.py check LOG [--killed PID,PID]   the verdict: exit 0, or 1
    python tools/lifecycle.py lanes LOG [--killed PID,PID]   the drawing, a summary, the verdict
    python tools/lifecycle.py race [--clients N] [--buck PATH]   a real cold race of two versions

The tools beside this file (chaos.py, bench.py) share load_buck(), copy_sources(),
other_version(), clean_env() and processes().
"""
import collections
import importlib.util
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))     # tools/
ROOT = os.path.dirname(HERE)                          # the repository: buck.py, buckd.py, ...
BUCK = os.path.join(ROOT, "buck.py")
GUARANTEES = {1: "one buckd at a time", 2: "one client starting/killing at a time",
              3: "a compatible version only"}
OPENS = {"daemon.locked": 1, "restart.1": 2}     # a section's first step: its guarantee
CLOSES = {"daemon.exit": 1, "restart.6": 2}      # and its last


def load(path):
    """The log at path, an entry per line (line n is entry n-1): its JSON object, or
    {"_bad": text} for a line that is not a log line (e.g. a torn last one)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [parse(text) for text in f.read().splitlines()]


def parse(text):
    try:
        x = json.loads(text)
    except ValueError:
        x = None
    ok = isinstance(x, dict) and isinstance(x.get("pid"), int) and isinstance(x.get("step"), str)
    return x if ok else {"_bad": text}


def numbered(lines):
    """(line number, line) for each log line, the bad ones left out."""
    return [(n, x) for n, x in enumerate(lines, 1) if "_bad" not in x]


def check(lines, killed=()):
    """The violations of the three guarantees in a log (load()'s list), in line order,
    [] if there are none. `killed`: pids that died without closing their section (SIGKILL)."""
    found = [(n, f"line {n} is not a log line (a torn write?): {x['_bad'][:60]!r}")
             for n, x in enumerate(lines, 1) if "_bad" in x]
    return [message for _, message in sorted(found + overlaps(lines, killed) + unchecked(lines))]


def process(x):
    """A process: its pid, and its `run` where the log has one (a pid can be reused)."""
    return x["pid"], x.get("run")


def overlaps(lines, killed):
    """Guarantees 1 and 2: (line, message) for each section opened in a dir while another of
    its kind is open there. A killed pid's section ends at its last line: the kernel
    released its lock when it died, after that line, before the next holder's first. A
    buckd's section also ends at a client's restart.3 naming it: the client saw its lock free."""
    last = {process(x): n for n, x in numbered(lines)}
    held, found = {}, []                 # (guarantee, dir): {process: line opening its section}
    for n, x in numbered(lines):
        me, step = process(x), x["step"]
        if step == "restart.3":          # a client saw that buckd's lock free: it is gone
            gone = held.get((1, x.get("dir")), {})
            for p in [p for p in gone if p[0] == x.get("daemon_pid")]:
                del gone[p]
        g = OPENS.get(step) or CLOSES.get(step)
        if g is None:
            continue
        sections = held.setdefault((g, x.get("dir")), {})
        if step in CLOSES:
            sections.pop(me, None)
            continue
        for other, m in list(sections.items()):
            if other[0] in killed and last[other] < n:
                del sections[other]
                continue
            whose = "its own" if other == me else f"pid {other[0]}'s"
            found.append((n, f"guarantee {g} ({GUARANTEES[g]}): line {n} pid {me[0]} {step} "
                             f"while {whose} {step} at line {m} is open (dir {x.get('dir')})"))
        sections[me] = n
    return found


def unchecked(lines):
    """Guarantee 3: (line, message) for each connect.3 accepting a buckd of another version,
    and each command not preceded by its client's own accepting connect.3 of that buckd,
    or sent to a buckd whose own lines give another version."""
    daemons = {}                         # (dir, pid): (version, its first line), the latest
    accepted, last_check, found = set(), {}, []
    for n, x in numbered(lines):
        pid, version, dp = process(x), x.get("version"), x.get("daemon_pid")
        said = f"guarantee 3 ({GUARANTEES[3]}): line {n} pid {pid[0]}"
        if x.get("role") == "daemon" and daemons.get((x.get("dir"), pid[0]), (0, 0))[0] != version:
            daemons[x.get("dir"), pid[0]] = (version, n)
        if x["step"] == "connect.3":
            last_check[pid] = n, dp
            if x.get("ok") and x.get("daemon_version") != version:
                found.append((n, f"{said} accepted buckd {dp} of version "
                                 f"{x.get('daemon_version')}, its own is {version}"))
            elif x.get("ok"):
                accepted.add((pid, dp))
        elif x["step"] == "command":
            said += f" command {x.get('name')} on buckd {dp}"
            theirs, first = daemons.get((x.get("dir"), dp), (version, None))
            if (pid, dp) not in accepted:
                m, seen = last_check.get(pid, (None, None))
                found.append((n, f"{said} with no earlier connect.3 of its own accepting "
                                 f"buckd {dp} at version {version}" + (
                                     f" (its last connect.3, line {m}, was for buckd {seen})"
                                     if m else "")))
            elif theirs != version:
                found.append((n, f"{said}, whose line {first} says version {theirs}; "
                                 f"its own is {version}"))
    return found


# --- The view

ABBREVIATIONS = {"restart.1": "r1 LOCK", "restart.5": "r5 up", "restart.6": "r6 FREE",
                 "daemon.locked": "LOCKED", "daemon.exit": "EXIT"}
HOW = {"rpc": "rpc", "sigterm": "TERM", "sigkill": "KILL"}
SHUTDOWN = {"self-check": "check", "startup failure": "start"}
LEGEND = """\
legend: a row per log line (# its number), a column per process: C client,
  D buckd, v its version. others: clients without a column, as PID STEP;
  N reuse D P: N clients that only read buckd.info, checked it and used buckd P.
  client connection: c1 info|none  read buckd.info (found or not)
    c3 ok|VERS|FAIL  checked the version: a match, a mismatch, no answer
    (c3 OK!? accepted a mismatch)   >NAME  buckd accepted command NAME
  start/restart: r1 LOCK  took lifecycle.lock   r2 kill|none  sent a kill (none:
    no buckd)   r3 rpc|TERM|KILL  the old buckd is gone (by the Kill call,
    SIGTERM, SIGKILL)   r4 run|exN  ran `buck daemon` (exit N)   r5 up  ready
    r6 FREE  releasing lifecycle.lock
  buckd: LOCKED  took buckd.pid   :PORT  serving   !WHY  shutting down (kill,
    check, signal, idle, panic, start)   EXIT  its last line
  |  holds its lock (lifecycle.lock, buckd.pid)   .  waits for lifecycle.lock"""


def abbrev(x):
    """A log line's step in at most 7 characters, as LEGEND explains."""
    step, g = x["step"], x.get
    if step == "connect.1":
        return "c1 info" if g("found") else "c1 none"
    if step == "connect.3":
        same = g("daemon_version") == g("version")
        if g("ok"):
            return "c3 ok" if same else "c3 OK!?"
        return "c3 FAIL" if same or g("daemon_version") is None else "c3 VERS"
    if step == "restart.2":
        return "r2 none" if g("daemon_pid") is None else "r2 kill"
    if step == "restart.3":
        return "r3 " + HOW.get(g("how"), str(g("how")))[:4]
    if step == "restart.4":
        return "r4 run" if g("exit") in (0, None) else f"r4 ex{g('exit')}"[:7]
    if step == "daemon.serving":
        return f":{g('port')}"
    if step == "daemon.shutdown":
        return "!" + SHUTDOWN.get(g("path"), str(g("path")))[:6]
    if step == "command":
        return f">{g('name')}"[:7]
    return ABBREVIATIONS.get(step, step[:7])


def name(x):
    return ("D " if x.get("role") == "daemon" else "C ") + str(x["pid"])


def lanes(lines, width=100):
    """The log drawn as swimlanes, a table per daemon dir, then the legend. No line is
    wider than `width` (at least 80). Lines that are not log lines are named, not drawn."""
    good = numbered(lines)
    dirs = dict.fromkeys(x.get("dir") for _, x in good)
    parts = [table([(n, x) for n, x in good if x.get("dir") == d], width) for d in dirs]
    parts += [f"line {n} is not a log line: skipped" for n, x in enumerate(lines, 1) if "_bad" in x]
    return "\n\n".join(parts + [LEGEND])


def reusers(procs):
    """The clients that only read buckd.info, checked the version and used that buckd."""
    return {p for p, xs in procs.items()
            if all(x["step"] == "command" or abbrev(x) in ("c1 info", "c3 ok") for x in xs)}


def rank(xs):
    """0 for a buckd, 1 for a client that killed or launched one, else 2."""
    if xs[0].get("role") == "daemon":
        return 0
    return 1 if any(x["step"] in ("restart.2", "restart.4") for x in xs) else 2


def columns(procs, quiet, room):
    """The pids that get a column of their own, clients first, and the columns' width: the
    best ranked that fit in `room`, less 18 for the others column if it is needed."""
    wanted = sorted((p for p in procs if p not in quiet), key=lambda p: rank(procs[p]))
    w = max(8, 1 + max(len(name(xs[0])) for xs in procs.values()))
    fits = (room - (18 if quiet or len(wanted) * w > room else 0)) // w
    return sorted((p for p in procs if p in wanted[:fits]), key=lambda p: rank(procs[p]) == 0), w


def table(rows, width):
    """One dir's swimlanes: a column per process that fits, the others in the last column,
    and each run of lines of clients that only reuse a buckd folded into one row."""
    procs = {}
    for _, x in rows:
        procs.setdefault(x["pid"], []).append(x)
    gutter, quiet = len(str(rows[-1][0])) + 1, reusers(procs)
    shown, w = columns(procs, quiet, width - gutter)
    folded = set(procs) - set(shown) - quiet
    room, state, ends = width - gutter - w * len(shown), {}, {p: xs[-1] for p, xs in procs.items()}

    def row(n, cells, other):
        return (f"{n:>{gutter - 1}} " + "".join(c.ljust(w) for c in cells) + other[:room]).rstrip()

    def mark(pids):
        marks = {state.get(p) for p in pids}
        return "|" if "|" in marks else "." if "." in marks else ""

    d = str(rows[0][1].get("dir"))
    out = ["dir " + (d if len(d) <= width - 4 else "..." + d[7 - width:]),
           row("#", [name(procs[p][0]) for p in shown], "others" if folded or quiet else ""),
           row("", ["v" + str(procs[p][0].get("version"))[:4] for p in shown], "")]
    for reusing, group in itertools.groupby(rows, key=lambda r: r[1]["pid"] in quiet):
        group = list(group)
        if reusing:
            users = {x["pid"] for _, x in group}
            used = sorted({x.get("daemon_pid") for p in users for x in procs[p]} - {None})
            out.append(row(group[0][0], [mark([p]) for p in shown],
                           f"{len(users)} reuse " + ",".join(f"D {p}" for p in used)))
            continue
        for n, x in group:
            p = x["pid"]
            cells = [abbrev(x) if q == p else mark([q]) for q in shown]
            out.append(row(n, cells, f"{p} {abbrev(x)}" if p in folded else mark(folded)))
            advance(state, x, ends[p] is x)
    return "\n".join(out)


def advance(state, x, last):
    """state[pid] after log line x: "|" holding its lock, "." waiting for lifecycle.lock."""
    p, step, short = x["pid"], x["step"], abbrev(x)
    if step in CLOSES or (last and x.get("role") != "daemon"):
        state[p] = None                 # a client's lines end: whatever it held, it is gone
    elif step in OPENS:
        state[p] = "|"
    elif short in ("c1 none", "c3 FAIL", "c3 VERS"):
        state[p] = "."
    elif step == "restart.3":
        state[x.get("daemon_pid")] = None


def summary(lines, width=100):
    """A few plain sentences: who took lifecycle.lock, in order, and what each did; who
    waited for it; which buckd each version got; which buckds went away, and why."""
    return "\n".join(textwrap.fill(s, width) for s in turns(lines) + versions(lines))


DEEDS = {"restart.3": "killed D {daemon_pid} ({how})", "restart.5": "launched D {daemon_pid}"}


def turns(lines):
    """The turns at lifecycle.lock, in order, and how many turns of others each client
    waited through, from its connect.1 to its restart.1."""
    order, turn, wanting, waited, holders = [], {}, {}, {}, {}
    for _, x in numbered(lines):
        p, step, d = x["pid"], x["step"], x.get("dir")
        if step == "connect.1":
            wanting[p] = [d, len(holders.get(d, ()))]
        elif abbrev(x) == "c3 ok":
            wanting.pop(p, None)
        elif step == "restart.1":
            for q, w in wanting.items():
                w[1] += q != p and w[0] == d
            waited[p] = waited.get(p, 0) + wanting.pop(p, [d, 0])[1]
            holders.setdefault(d, set()).add(p)
            turn[p] = [f"C {p}"]
            order.append(turn[p])
        elif step == "restart.6":
            holders.get(d, set()).discard(p)
        elif step in DEEDS and p in turn:
            turn[p].append(DEEDS[step].format(daemon_pid=x.get("daemon_pid"), how=x.get("how")))
    said = []
    for busy, group in itertools.groupby(order, key=lambda t: len(t) > 1):
        said += ([t[0] + " " + ", ".join(t[1:]) for t in group] if busy else
                 [", ".join(t[0] for t in group) + " (nothing to do)"])
    waits = [f"C {p} {n}" for p, n in waited.items() if n]
    return ["lifecycle.lock was taken, in order, by: " + "; ".join(said or ["nobody"]) + "."] + (
        ["Waited for lifecycle.lock, through this many turns of others: " + ", ".join(waits) + "."]
        if waits else [])


def versions(lines):
    """Each version's buckds and the buckd each of its clients last connected to; the
    mismatches seen; each buckd's shutdown and its reason."""
    daemons, clients, mismatches, shutdowns = {}, {}, [], []
    for _, x in numbered(lines):
        p, step, v, dp = x["pid"], x["step"], str(x.get("version"))[:4], x.get("daemon_pid")
        if step == "daemon.locked":
            daemons.setdefault(v, []).append(f"D {p}")
        elif step == "daemon.shutdown":
            shutdowns.append(f"D {p} (v{v}) shut down ({x.get('path')}): {x.get('reason')}.")
        elif x.get("role") == "client":
            last = clients.setdefault(v, {}).setdefault(p, "none")
            clients[v][p] = f"D {dp}" if abbrev(x) == "c3 ok" else last
            if abbrev(x) == "c3 VERS":
                mismatches.append(f"C {p} (v{v}) at D {dp} (v{str(x.get('daemon_version'))[:4]})")
    said = []
    for v, last in clients.items():
        on = {}
        for p, d in last.items():
            on.setdefault(d, []).append(f"C {p}")
        said.append(f"Version {v}: buckds {', '.join(daemons.get(v, [])) or 'none'}; its "
                    f"{len(last)} client{'s' * (len(last) > 1)} last connected to "
                    + "; ".join(f"{d} ({', '.join(ps)})" for d, ps in on.items()) + ".")
    if mismatches:
        said.append("Version mismatches, a client finding a buckd of another: "
                    + ", ".join(mismatches) + ".")
    return said + shutdowns


# --- What the tools share: buck.py's names, and another version of it

def load_buck(buck_py=BUCK):
    """buck.py at path buck_py as a module (importing it is cheap and starts nothing): the
    names (SOURCES, MARKER, LOG_ENV, ...) of the buck that a tool drives, never copies of
    them. This repository's is `import buck`; another (--buck PATH) is loaded under a name
    of its own."""
    path = os.path.realpath(buck_py)
    if path == os.path.realpath(BUCK):
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        import buck
        return buck
    name = f"buck_at_{path}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def copy_sources(buck_py, dest, append=""):
    """A copy of buck_py's SOURCES (its own buck.SOURCES: the files whose checksum is the
    version, all that a checkout needs to run) in the new dir `dest`, `append` added to its
    buckd.py. Returns the copy's buck.py."""
    here = os.path.dirname(os.path.realpath(buck_py))
    os.makedirs(dest)
    for f in load_buck(buck_py).SOURCES:
        os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
        shutil.copy(os.path.join(here, f), os.path.join(dest, f))
    with open(os.path.join(dest, "buckd.py"), "a") as f:
        f.write(append)
    return os.path.join(dest, "buck.py")


def other_version(buck_py, other):
    """A copy of buck_py's sources in the new dir `other`, buckd.py one line longer: another
    version, as the version is a checksum of SOURCES. Returns the copy's buck.py."""
    return copy_sources(buck_py, other, "# another version\n")


def clean_env(buck, **values):
    """os.environ for the clients a tool starts: none of buck's variables (its names ending
    in _ENV: LOG_ENV, STOP_AT_ENV, CHECK_INTERVAL_ENV, ...) inherited from the caller's shell,
    where a stray one would change what we measure or SIGSTOP a client; then `values`."""
    knobs = {getattr(buck, name) for name in dir(buck) if name.endswith("_ENV")}
    return {**{k: v for k, v in os.environ.items() if k not in knobs}, **values}


Proc = collections.namedtuple("Proc", "pid argv state pgrp sid")


def processes(home):
    """The live processes but this one whose environment has HOME=home (clients, launchers,
    buckds), as Procs: pid, argv (bytes), state (a letter of /proc/PID/stat), pgrp, sid."""
    found, needle = [], b"HOME=" + os.fsencode(home)
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0") or int(name) == os.getpid():
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:-1]
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue                    # gone meanwhile, or not ours to read
        if stat[0] != b"Z":
            found.append(Proc(int(name), argv, stat[0].decode(), int(stat[2]), int(stat[3])))
    return found


# --- A real race

def race(buck_py, clients=12):
    """Start `clients` `buck server` clients at once from cold, alternately of buck_py's
    version and of another, then `buck kill` with one of each. Prints the lanes, the
    summary, each client's end and the verdict; returns the exit code."""
    buck = load_buck(buck_py)
    tmp = tempfile.mkdtemp(prefix=f"{buck.DAEMON}-race-")
    home, repo, log = (os.path.join(tmp, f) for f in ("home", "repo", "lifecycle.log"))
    try:
        scripts = [os.path.abspath(buck_py), other_version(buck_py, os.path.join(tmp, "other"))]
        os.mkdir(home)
        os.mkdir(repo)
        open(os.path.join(repo, buck.MARKER), "w").close()
        env = clean_env(buck, HOME=home, **{buck.LOG_ENV: log})
        start = lambda script, command: subprocess.Popen(
            [sys.executable, script, command], cwd=repo, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs = [start(scripts[i % 2], "server") for i in range(clients)]
        ends = [finish(p) for p in procs]
        for script in scripts:
            finish(start(script, "kill"))
        lines = load(log) if os.path.exists(log) else []
    finally:
        left = leftovers(buck, home)    # also after an error or ^C: no buckd outlives a race
        shutil.rmtree(tmp, ignore_errors=True)
    killed = {p.pid for p in procs if p.returncode < 0} | set(left)
    killed |= {x.get("daemon_pid") for x in lines if x.get("how") == "sigkill"}
    print(lanes(lines), summary(lines), sep="\n\n", end="\n\n")
    for i, (p, (code, err)) in enumerate(zip(procs, ends)):
        print(f"client {p.pid} ({'other' if i % 2 else 'this'} version): exit {code}"
              + (f": {err}" if err else ""))
    problems = check(lines, killed) + [f"{buck.DAEMON} {p} was still running: SIGKILLed"
                                       for p in left]
    if not lines:
        problems.append(f"the log is empty: do {buck.TOOL} and {buck.DAEMON} write {buck.LOG_ENV}?")
    return verdict(lines, problems)


def finish(proc, timeout=120):
    """Wait for a client (SIGKILL it after `timeout` s): its exit code, last stderr line."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, (err.strip().splitlines() or [""])[-1]


def leftovers(buck, home):
    """The buckds still running under home, each SIGKILLed. Only the process the kernel
    says holds a buckd.pid lock is signalled (buckd.holder): a pid from the log may have
    been reused. The daemon dirs are buck_commands.all_daemon_dirs()'s, with HOME=home."""
    load_buck()                         # ROOT on sys.path, `import buck`: then buckd imports
    import buckd, buck_commands
    saved, os.environ["HOME"] = os.environ.get("HOME"), home
    try:
        dirs, _ = buck_commands.all_daemon_dirs()
    finally:
        if saved is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = saved
    pids = [pid for pid in map(buckd.holder, dirs) if pid and pid > 1]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


# --- The command line

USAGE = ("usage: tools/lifecycle.py check|lanes LOG [--killed PID,PID]"
         " | race [--clients N] [--buck PATH]")


def verdict(lines, problems):
    print("\n".join(problems) or f"ok: {len(lines)} lines, the three guarantees hold")
    return 1 if problems else 0


def options(args, allowed):
    """--name value pairs as a dict; ValueError(USAGE) for anything else."""
    if len(args) % 2 or any(k not in allowed for k in args[::2]):
        raise ValueError(USAGE)
    opts = dict(zip(args[::2], args[1::2]))
    for k in ("--clients", "--killed"):
        if not opts.get(k, "0").replace(",", "").isdigit():
            raise ValueError(f"{k} takes a number, or numbers joined by commas: {opts[k]!r}")
    return opts


def main(argv):
    """check, lanes or race, as the module docstring says. Exit 0: all is well; 1: a
    guarantee was broken; 2: the command line or the file is wrong."""
    try:
        command, *args = argv or [""]
        if command == "race":
            opts = options(args, ("--clients", "--buck"))
            return race(opts.get("--buck", BUCK), int(opts.get("--clients", 12)))
        if command not in ("check", "lanes") or not args:
            raise ValueError(USAGE)
        killed = options(args[1:], ("--killed",)).get("--killed", "")
        killed = {int(p) for p in killed.split(",") if p}
        lines = load(args[0])
    except (OSError, ValueError) as e:
        print(f"lifecycle: {e}", file=sys.stderr)
        return 2
    if command == "lanes":
        print(lanes(lines), summary(lines), sep="\n\n", end="\n\n")
    return verdict(lines, check(lines, killed))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
