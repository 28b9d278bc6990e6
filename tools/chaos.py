#!/usr/bin/env python3
"""chaos: a seeded, bounded, randomized soak of the buckd lifecycle (Linux). A development
tool, not part of buck: it imports buck and buckd for their names and the daemon dir's files.

    .venv/bin/python tools/chaos.py [--seconds 120] [--seed 1] [--workers 6] [--buck buck.py]

The names it uses (the marker file, the environment variables...) are those of the buck.py
it drives (--buck, by default the one in the parent dir of tools/); the daemon dirs and their
files are read with this checkout's buck and buckd (buck.daemon_dir, buckd.holder).

Setup, in a temp dir: a HOME; a repo (.buckconfig) with a tree to hash (nested dirs, odd
names, a 2 MB file; sha256sum's output computed once); a copy of buck.SOURCES, which the
soak runs (an edit of the checkout meanwhile is no third version); a second buck version (a
copy with one comment added to buckd.py: lifecycle.other_version); three isolation dirs;
three decoys (`sleep 100000`: processes of ours that buck must never signal).

Workers (threads) run real clients of either version in any isolation dir: server --json,
status --json, hash, debug sleep 0-2, a burst of 20 concurrent `debug sleep 1` (a --burst
above buckd.MAX_COMMANDS, with a long --burst-sleep, makes buckd refuse some: busy),
`status --all [--json]` (every buckd of the HOME, no isolation dir), a `server --json` that
sets BUCKD_IDLE_TIMEOUT or BUCKD_CHECK_INTERVAL unlike the running buckd's (it applies it
live, in one line), sometimes kill, rarely killall racing `server` starts in every isolation
dir (commands running elsewhere end with "buckd shut down during the command", a failure like
any other; killall exits 1 naming a dir whose lifecycle.lock a starting client holds) and
debug crash. A fault thread meanwhile injects:
SIGKILL of a client, a launcher (`buck daemon` still in our session) or a buckd; SIGSTOP,
then SIGCONT within 3 s, of a client or a buckd; Ctrl-C (SIGINT to a client's process
group, launcher included, as a terminal sends it; half the time to a client that is
starting buckd); buckd.info garbled, truncated or deleted; buckd.pid rewritten in place or
replaced, naming a live decoy.

Violations, checked while it runs (a monitor every 0.2 s) and at the end:
- two running (not stopped) buckd for one isolation dir for more than 3 s: a replaced
  buckd.pid lets the old one live only until its next self-check (every 0.2-1 s);
- a decoy that died without us killing it: buck signalled a stranger's process;
- a client running longer than 40 s (it is killed); an exit code not 0, 1, or 130 after
  Ctrl-C; a failure whose last line (`  | ` quotes aside) is no `buck: <reason>`; a client
  traceback (but not Python's own, when Ctrl-C comes before buck.py's first line runs);
- what a client that exited 0 printed: `server --json` naming a buckd of another version,
  or, with a setting unlike that buckd's, no line saying the change; `status [--all]
  --json` no JSON, a decoy named as a buckd, a running buckd without issue 20's fields
  (commands, rss_bytes, ...); a `status --all` line naming no daemon dir; `hash` output
  other than sha256sum's; `killall` leaving a buckd that held buckd.pid before it began;
- a buckd stderr quoted by a client (`  | ` lines) showing a panic other than `debug crash`;
- a buckd a client lost under a command (`lost buckd (pid N)`) that we did not SIGKILL,
  SIGSTOP or `debug crash`;
- a process with our HOME still running after the final `kill`s (it is then SIGKILLed);
- lifecycle.check() over BUCK_LIFECYCLE_LOG (tools/lifecycle.py), with killed= every pid
  we SIGKILLed. Guarantee-1 findings that name a daemon dir whose buckd.pid we replaced
  are skipped: we made two daemons possible there ourselves.
Prints a report; exits 1 on any violation, else 0 (130 if interrupted). Stops by itself
within --seconds + 65 s, and removes every process and file it made, Ctrl-C or not.
"""
import argparse
import collections
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import lifecycle         # beside us in tools/: the checker, load_buck(), other_version()

buck = lifecycle.load_buck()    # ROOT on sys.path: the product's own helpers
import buckd            # noqa: E402  (after buck: buckd imports it)

PY = sys.executable
ISOLATION_DIRS = ("v2", "iso-a", "iso-b")
CHECK_INTERVAL = 0.5    # BUCKD_CHECK_INTERVAL of every daemon
DUPLICATE_LIMIT = 3.0   # seconds two running buckd may share a dir
CLIENT_BOUND = 40.0     # seconds a client may run
FINAL_BUDGET = 10.0     # seconds for the final kills
OTHER_VERSION_ODDS = 0.1
ACTIONS = {"server": 20, "status": 15, "hash": 20, "sleep": 20, "burst": 2, "status_all": 4,
           "settings": 4, "kill": 4, "killall": 2, "crash": 1}
ALL_DIRS = ("status_all", "killall")   # actions on every buckd of the HOME: no --isolation-dir
SETTING_VALUES = {buck.IDLE_TIMEOUT_ENV: ("0", "1.5", "3", "100"),     # valid, and each check
                  buck.CHECK_INTERVAL_ENV: ("0.2", "0.3", "1")}        # interval <= 1 s (see above)
RUNNING_FIELDS = {"commands", "rss_bytes", "peak_rss_bytes", "cpu_s", "check_interval_s",
                  "idle_timeout_s"}
FAULTS = {"sigkill": 7, "stop_cont": 3, "ctrl_c": 3, "damage_info": 3, "pid_names_decoy": 4}
HASH_ARGS = (("tree",), ("tree/big.bin", "tree/a", "tree/with space"))


def make_tree(repo, rng):
    """The tree `hash` reads: nested dirs, odd names, one 2 MB file."""
    names = [f"a/f{i}.txt" for i in range(12)] + [f"b/c/g{i}.dat" for i in range(12)]
    names = [os.fsencode(n) for n in names + [f"h{i}" for i in range(6)]]
    for name in names + [b"with space", b"back\\slash", b"new\nline", b"not utf8 \xff"]:
        path = os.path.join(os.fsencode(repo), b"tree", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rng.randbytes(rng.randrange(4096)))
    with open(os.path.join(repo, "tree", "big.bin"), "wb") as f:
        f.write(rng.randbytes(2 << 20))


def expected_hash(repo, args):
    """sha256sum's output for `buck hash ARGS` in repo: a dir stands for its files, sorted."""
    paths = []
    for arg in map(os.fsencode, args):
        top = os.path.join(os.fsencode(repo), arg)
        if os.path.isdir(top):
            below = [os.path.relpath(os.path.join(root, f), top)
                     for root, _, files in os.walk(top) for f in files]
            paths += [os.path.join(arg, rel) for rel in sorted(below)]
        else:
            paths.append(arg)
    return subprocess.run(["sha256sum", "--", *paths], cwd=repo, capture_output=True,
                          check=True).stdout


def version_of(script):
    return subprocess.run([PY, script, "version"], capture_output=True, text=True,
                          check=True).stdout.split()[1]


def isolation_of(argv):
    return argv[argv.index(b"--isolation-dir") + 1].decode() if b"--isolation-dir" in argv else "v2"


class Soak:
    def __init__(self, opts):
        self.opts, self.lock = opts, threading.Lock()
        self.names = names = lifecycle.load_buck(opts.buck)   # its MARKER, LOG_ENV, TOOL...
        self.tmp = tempfile.mkdtemp(prefix="chaos-")
        self.home, self.repo = os.path.join(self.tmp, "home"), os.path.join(self.tmp, "repo")
        self.log = os.path.join(self.tmp, "lifecycle.log")
        self.env = lifecycle.clean_env(names, HOME=self.home, **{
            names.LOG_ENV: self.log, names.CHECK_INTERVAL_ENV: str(CHECK_INTERVAL)})
        self.says = re.escape(f"{names.TOOL}: ")                # a line of buck's own
        self.crash_said = f"`{names.TOOL} debug crash` was invoked"   # its simulated panic
        self.sid = os.getsid(0)
        self.clients, self.decoys = {}, []      # pid -> Popen; Popens
        self.killed, self.interrupted, self.stopped = set(), set(), set()
        self.replaced, self.seen_buckds, self.panics, self.lost = set(), set(), set(), set()
        self.ever_stopped, self.unexplained = set(), {}
        self.actions, self.outcomes, self.faults = (collections.Counter() for _ in range(3))
        self.failures, self.notices = collections.Counter(), collections.Counter()
        self.violations = collections.defaultdict(list)
        self.dup_time, self.longest_dup = dict.fromkeys(ISOLATION_DIRS, 0.0), 0.0
        self.halt, self.quiet = threading.Event(), threading.Event()
        self.workers, self.notes = [], []

    def setup(self):
        rng = random.Random(self.opts.seed)
        os.makedirs(self.home)
        os.makedirs(self.repo)
        open(os.path.join(self.repo, self.names.MARKER), "w").close()
        make_tree(self.repo, rng)
        self.expected = {args: expected_hash(self.repo, args) for args in HASH_ARGS}
        self.buck = lifecycle.copy_sources(self.opts.buck, os.path.join(self.tmp, "buck"))
        self.other = lifecycle.other_version(self.buck, os.path.join(self.tmp, "other"))
        self.versions = {s: version_of(s) for s in (self.buck, self.other)}
        os.environ["HOME"] = self.home  # buck's daemon dirs, as our clients have them
        cwd = os.getcwd()
        os.chdir(self.repo)
        try:
            self.dirs = {iso: buck.daemon_dir(iso) for iso in ISOLATION_DIRS}
        finally:
            os.chdir(cwd)
        self.decoys = [self.start_decoy() for _ in range(3)]

    def start_decoy(self):
        return subprocess.Popen(["sleep", "100000"], process_group=0, stdin=subprocess.DEVNULL)

    # --- processes

    def scan(self):
        """The live processes carrying our HOME: clients, launchers, buckds."""
        return lifecycle.processes(self.home)

    def buckds(self):
        """{pid: Proc} of the buckds: `buck daemon` processes detached from our session."""
        return {p.pid: p for p in self.scan() if b"daemon" in p.argv and p.sid != self.sid}

    def launchers(self):
        """`buck daemon` processes still in our session: waiting for the buckd they start."""
        return [p for p in self.scan() if b"daemon" in p.argv and p.sid == self.sid]

    def current_daemon(self, iso, buckds):
        """The buckd a dir's files name (the buckd.pid lock holder, buckd.info's pid), if it
        is one /proc confirms as ours."""
        d = self.dirs[iso]
        named = [buckd.holder(d), (buckd.read_info(d) or {}).get("pid")]
        return next((pid for pid in named if pid in buckds), None)

    def send(self, pid, sig, group=False):
        """Signal a process of ours; a SIGKILL is remembered (lifecycle.check's killed=)."""
        if sig == signal.SIGKILL:
            self.killed.add(pid)
        try:
            (os.killpg if group else os.kill)(pid, sig)
            return True
        except ProcessLookupError:
            self.killed.discard(pid)    # gone before the signal: not killed by us
            return False

    def live_clients(self):
        with self.lock:
            return [p for p in self.clients.values() if p.returncode is None]

    # --- clients

    def spawn(self, script, iso, args, action, setting=None):
        """A client in isolation dir iso (None: no --isolation-dir, for every buckd);
        setting: (name, value) of a daemon setting in its environment."""
        where = ["--isolation-dir", iso] if iso else []
        with self.lock:                 # the decoys alive now: a buckd can have none's pid
            decoys = {d.pid: d for d in self.decoys}
        holders = {d: buckd.holder(d) for d in self.dirs.values()} if action == "killall" else {}
        proc = subprocess.Popen([PY, script, *where, *args], cwd=self.repo,
                                env=dict(self.env, **dict([setting] if setting else [])),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, process_group=0)   # a terminal's job
        proc.script, proc.iso, proc.args, proc.action = script, iso, tuple(args), action
        proc.started, proc.decoys, proc.setting = time.monotonic(), decoys, setting
        proc.holders = holders          # killall: each dir's buckd before it began
        with self.lock:
            self.clients[proc.pid] = proc
        return proc

    def finish(self, proc, bound=CLIENT_BOUND):
        """Wait for a client (SIGKILL past its bound), then check what it did."""
        try:
            out, err = proc.communicate(timeout=max(0.0, proc.started + bound - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.violation("client ran too long", f"{self.label(proc)}: > {bound:.0f} s, killed")
            self.send(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        with self.lock:
            del self.clients[proc.pid]
        self.check(proc, out, err)

    def label(self, proc):
        which = "other" if proc.script == self.other else "buck"
        ctrl_c = ", after Ctrl-C" if proc.pid in self.interrupted else ""
        where = f" --isolation-dir {proc.iso}" if proc.iso else ""
        return f"{which}{where} {' '.join(proc.args)} (pid {proc.pid}{ctrl_c})"

    def check(self, proc, out, err):
        """A client's exit code, stderr and output against the invariants."""
        code, lines = proc.returncode, err.decode(errors="replace").splitlines()
        own = [line for line in lines if line.strip() and not line.startswith("  | ")]
        interrupted = proc.pid in self.interrupted and code in (130, -signal.SIGINT)
        outcome = ("killed" if proc.pid in self.killed else "130" if interrupted
                   else str(code) if code in (0, 1) else "other")
        with self.lock:
            self.outcomes[proc.action, outcome] += 1
        if outcome == "killed":
            return
        if any(line.startswith("Traceback") for line in lines):
            if self.before_first_line(proc, own):
                self.count(self.notices, "(Ctrl-C before buck.py ran: Python's traceback)", proc)
                return
            where = [line.strip() for line in own if line.startswith('  File "')][-1:]
            self.violation("client traceback", f"{self.label(proc)}: exit {code}: "
                           f"{own[:1] + where + own[-1:]}")
        elif code == 1 and own and re.match(self.says + r".*[^:\s]\s*$", own[-1]):
            self.count(self.failures, own.pop(), proc)
        elif code != 0 and not interrupted:
            self.violation("bad exit or last line", f"{self.label(proc)}: exit {code}: {own[-3:]}")
        if code == 0:
            self.check_output(proc, out, own)
        for line in own:
            if re.match(self.says, line):
                self.count(self.notices, line, proc)
        self.check_quoted_panic(proc, lines)
        self.check_lost_daemon(proc, lines)

    def before_first_line(self, proc, own):
        """A Ctrl-C that interrupted Python's own startup, before any line of buck.py ran:
        no frame of the script at a line > 0. Not buck's to fix."""
        frames = re.findall(r'File "(.*)", line (\d+)', "\n".join(own))
        return (proc.pid in self.interrupted and own[-1].startswith("KeyboardInterrupt")
                and not any(path == proc.script and int(n) > 0 for path, n in frames))

    def check_output(self, proc, out, own):
        """What a client that exited 0 printed."""
        if proc.args[0] == "server":
            try:
                reply = json.loads(out)
                version = reply["version"]
            except (ValueError, KeyError, TypeError):
                reply, version = {}, f"unreadable output {out[:80]!r}"
            if version != self.versions[proc.script]:
                self.violation("used another version", f"{self.label(proc)}: client "
                               f"{self.versions[proc.script]} got a daemon of {version}")
            self.check_running(proc, [reply])
            self.check_setting_said(proc, reply, own)
        elif proc.args[:2] == ("status", "--json"):
            try:
                self.check_running(proc, [json.loads(out)])
            except ValueError:
                self.violation("status --json output", f"{self.label(proc)}: {out[:80]!r}")
        elif proc.args[:3] == ("status", "--all", "--json"):
            self.check_status_all(proc, out)
        elif proc.args[:2] == ("status", "--all"):
            self.check_status_lines(proc, out)
        elif proc.args[0] == "killall":
            self.check_killall(proc)
        elif proc.args[0] == "hash" and out != self.expected[proc.args[1:]]:
            self.violation("hash differs from sha256sum", f"{self.label(proc)}: {len(out)} "
                           f"bytes, expected {len(self.expected[proc.args[1:]])}")

    def check_running(self, proc, rows):
        """Status rows of running buckds have the fields of issue 20's status."""
        for row in rows:
            if not isinstance(row, dict) or row.get("state") != "running":
                continue
            missing = RUNNING_FIELDS - row.keys()
            commands = row.get("commands", [])
            if missing or not all(isinstance(c, dict) and {"args", "client_pid", "running_s"}
                                  <= c.keys() for c in commands):
                self.violation("status fields", f"{self.label(proc)}: missing {sorted(missing)}"
                               f" or malformed commands {str(commands)[:80]}")

    def check_setting_said(self, proc, reply, own):
        """A setting the client gives unlike the buckd's it names is said in one line
        (applied, or why not): never silently ignored."""
        if not proc.setting or "pid" not in reply:
            return
        name, value = proc.setting
        had, given = reply.get(buck.SETTINGS[name][0]), float(value)
        said = f"{name} {had:g} -> {given:g} s" if isinstance(had, (int, float)) else None
        if had != given and not any(said and said in line for line in own):
            self.violation("setting silently ignored", f"{self.label(proc)}: buckd "
                           f"{reply['pid']} had {had}, and the client said nothing of it")

    def check_status_lines(self, proc, out):
        """`status --all`: a line per daemon dir (its state, or the running buckd's figures
        and the commands it runs), or that none runs."""
        home = os.fsencode(os.path.dirname(os.path.dirname(self.dirs["v2"])))
        none = f"no {self.names.DAEMON} running".encode()
        bad = [line for line in out.splitlines() if not (
            line == none or line.startswith(home) and b": " in line and b"pid " in line)]
        if bad:
            self.violation("status --all output", f"{self.label(proc)}: {bad[0][:100]!r}")

    def check_killall(self, proc):
        """killall exited 0: no buckd that held buckd.pid before it began still holds it
        (one that a racing client started meanwhile may run)."""
        left = {d: pid for d, pid in proc.holders.items() if pid and buckd.holder(d) == pid}
        if left:
            self.violation("killall exit 0, a buckd left", f"{self.label(proc)}: {left}")

    def check_status_all(self, proc, out):
        """`status --all --json`: a JSON array of objects, one per buckd. None but a dead
        one's (the pid its buckd.info names) may be a decoy that lived all through the
        command: buckd.pid naming a decoy makes no buckd."""
        try:
            daemons = json.loads(out)
            assert isinstance(daemons, list) and all(isinstance(x, dict) for x in daemons)
        except (ValueError, AssertionError):
            return self.violation("status --all --json output", f"{self.label(proc)}: no JSON "
                                  f"array of objects: {out[:80]!r}")
        with self.lock:
            decoys = {pid for pid, d in proc.decoys.items()
                      if d in self.decoys and d.poll() is None}
        named = [x.get("pid") for x in daemons
                 if x.get("pid") in decoys and x.get("state") != "dead"]
        if named:
            self.violation("status --all named a decoy", f"{self.label(proc)}: pids {named}")
        self.check_running(proc, daemons)

    def check_quoted_panic(self, proc, lines):
        """A buckd stderr quoted by a client: a panic there must be `debug crash`'s."""
        quoted = tuple(line[4:] for line in lines if line.startswith("  | "))
        panic = any("Traceback" in line or re.match(self.says, line) for line in quoted)
        if panic and not any(self.crash_said in line for line in quoted):
            with self.lock:
                new, _ = quoted not in self.panics, self.panics.add(quoted)
            if new:
                self.violation("buckd panicked", f"{self.label(proc)} quotes: {list(quoted[-2:])}")

    def check_lost_daemon(self, proc, lines):
        """A buckd that vanished under a command must have been SIGKILLed or SIGSTOPped
        by us (then maybe SIGKILLed as wedged), or have run `debug crash`."""
        lost = re.search(rf"lost {re.escape(self.names.DAEMON)} \(pid (\d+)\)", "\n".join(lines))
        if not lost or any(self.crash_said in line for line in lines):
            return
        pid = int(lost[1])
        with self.lock:
            if not any(pid in known for known in (self.killed, self.ever_stopped, self.lost)):
                self.unexplained[pid] = self.label(proc)
            self.lost.add(pid)

    def check_lost_daemons(self, lines):
        """At the end: a lost buckd is explained too if a client SIGKILLed it as its last
        resort (a restart.3 says "sigkill"), or if it had begun a clean shutdown whose grace
        for running commands ran out (its daemon.shutdown line); any other is a violation."""
        sigkilled = {x.get("daemon_pid") for x in lines if x.get("how") == "sigkill"}
        stopping = {x["pid"] for x in lines if x.get("step") == "daemon.shutdown"}
        for pid, label in self.unexplained.items():
            if pid not in sigkilled | stopping:
                self.violation("buckd died unexplained", f"{label} lost buckd {pid}, which "
                               "neither we nor a client SIGKILLed, nor we SIGSTOPped, nor crashed")

    def normalise(self, line, proc):
        """Like messages alike: no temp paths, pids, ports or times; versions as the
        client's own or the other one."""
        own = self.versions[proc.script]
        other, = set(self.versions.values()) - {own}
        line = line.replace(os.path.dirname(self.dirs["v2"]), "$DAEMONS").replace(self.tmp, "$TMP")
        line = re.sub(r"\d+(\.\d+)?", "N", line.replace(own, "<own>").replace(other, "<other>"))
        return re.sub(r"/vN\b", "/v2", line)

    def count(self, counter, line, proc):
        with self.lock:
            counter[self.normalise(line, proc)] += 1

    def violation(self, kind, detail):
        with self.lock:
            self.violations[kind].append(detail)

    # --- the threads: workers, faults, monitor

    def guarded(self, loop, *args):
        """Run a thread's loop; an exception of the soak itself is reported, not lost."""
        try:
            loop(*args)
        except Exception as e:
            self.violation("soak error (a bug of tools/chaos.py)", f"{loop.__name__}: {e!r}")

    def work(self, rng):
        """Until the deadline: a version, an isolation dir, an action; run it, check it."""
        while time.monotonic() < self.deadline and not self.halt.is_set():
            script = self.other if rng.random() < OTHER_VERSION_ODDS else self.buck
            iso = rng.choice(ISOLATION_DIRS)
            action = rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
            with self.lock:
                self.actions[action] += 1
            args = {"server": ["server", "--json"], "status": ["status", "--json"],
                    "hash": ["hash", *rng.choice(HASH_ARGS)], "kill": ["kill"],
                    "sleep": ["debug", "sleep", f"{rng.uniform(0, 2):.2f}"],
                    "burst": ["debug", "sleep", f"{self.opts.burst_sleep:g}"],
                    "status_all": ["status", "--all", "--json"] if rng.random() < 0.7
                    else ["status", "--all"],
                    "settings": ["server", "--json"],
                    "killall": ["killall"], "crash": ["debug", "crash"]}[action]
            iso = None if action in ALL_DIRS else iso
            setting = None
            if action == "settings":
                name = rng.choice(list(SETTING_VALUES))
                setting = (name, rng.choice(SETTING_VALUES[name]))
            procs = [self.spawn(script, iso, args, action, setting)
                     for _ in range(self.opts.burst if action == "burst" else 1)]
            if action == "killall":     # racing starts: a `server` in every isolation dir
                procs += [self.spawn(script, iso, ["server", "--json"], "server")
                          for iso in ISOLATION_DIRS]
            for proc in procs:
                self.finish(proc)

    def inject_faults(self, rng):
        """Until the deadline, at random moments: a fault, counted by what it did."""
        while not self.halt.wait(rng.uniform(0.2, 1.2)) and time.monotonic() < self.deadline:
            fault = rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
            try:
                done = getattr(self, fault)(rng)
            except OSError:             # its file went away meanwhile
                done = None
            with self.lock:
                self.faults[done or f"{fault}: no target"] += 1
            if rng.random() < 0.1:
                self.rotate_decoy(rng)

    def sigkill(self, rng):
        """SIGKILL a client, a launcher, or the buckd a dir's files name (else any buckd)."""
        kind = rng.choice(("client", "launcher", "buckd"))
        if kind == "client":
            pids = [p.pid for p in self.live_clients()]
        elif kind == "launcher":
            pids = [p.pid for p in self.launchers()]
        else:
            buckds = self.buckds()
            current = self.current_daemon(rng.choice(ISOLATION_DIRS), buckds)
            pids = [current] if current else sorted(buckds)
        return pids and self.send(rng.choice(pids), signal.SIGKILL) and f"SIGKILL {kind}"

    def stop_cont(self, rng):
        """SIGSTOP a client or a buckd, SIGCONT it within 3 s."""
        targets = [p.pid for p in self.live_clients()] + sorted(self.buckds())
        if not targets or not self.send(pid := rng.choice(targets), signal.SIGSTOP):
            return None
        self.stopped.add(pid)
        self.ever_stopped.add(pid)
        try:
            self.halt.wait(rng.uniform(0.1, 3.0))
        finally:
            self.send(pid, signal.SIGCONT)
            self.stopped.discard(pid)
        return "SIGSTOP+SIGCONT"

    def ctrl_c(self, rng):
        """Ctrl-C at a terminal: SIGINT to a client's process group (its launcher too);
        half the time to a client that is starting buckd."""
        clients = self.live_clients()
        if not clients:
            return None
        starting = {p.pgrp for p in self.launchers()}
        starters = [c for c in clients if c.pid in starting]
        proc = rng.choice(starters if starters and rng.random() < 0.5 else clients)
        self.interrupted.add(proc.pid)
        return self.send(proc.pid, signal.SIGINT, group=True) and (
            "Ctrl-C, starting buckd" if proc in starters else "Ctrl-C")

    def damage_info(self, rng):
        """buckd.info garbled, truncated to half, or deleted."""
        path = os.path.join(self.dirs[rng.choice(ISOLATION_DIRS)], self.names.INFO_FILE)
        how = rng.choice(("garbled", "truncated", "deleted"))
        if how == "garbled":
            with open(path, "r+b") as f:
                f.write(b"\0garbage{" + rng.randbytes(8))
        elif how == "truncated":
            os.truncate(path, os.path.getsize(path) // 2)
        else:
            os.unlink(path)
        return f"{self.names.INFO_FILE} {how}"

    def pid_names_decoy(self, rng):
        """buckd.pid naming a live decoy: rewritten in place (the file buckd still locks)
        or replaced by a new, unlocked file."""
        path = os.path.join(self.dirs[rng.choice(ISOLATION_DIRS)], self.names.PID_FILE)
        decoy = f"{rng.choice(self.decoys).pid}\n"
        if rng.random() < 0.5:
            with open(path, "r+") as f:
                f.truncate()
                f.write(decoy)
            return f"{self.names.PID_FILE} rewritten in place"
        with open(path + ".chaos", "w") as f:
            f.write(decoy)
        os.replace(path + ".chaos", path)
        self.replaced.add(os.path.dirname(path))
        return f"{self.names.PID_FILE} replaced"

    def rotate_decoy(self, rng):
        """Retire a decoy (killed by us: no violation) for a fresh one."""
        with self.lock:
            old = self.decoys.pop(rng.randrange(len(self.decoys)))
            self.decoys.append(self.start_decoy())
        old.kill()
        old.wait()

    def monitor(self):
        last = time.monotonic()
        while not self.quiet.wait(0.2):
            now = time.monotonic()
            self.check_decoys()
            self.check_duplicates(now - last)
            last = now

    def check_decoys(self):
        with self.lock:
            dead = [d for d in self.decoys if d.poll() is not None]
            self.decoys = [d for d in self.decoys if d not in dead]
            self.decoys += [self.start_decoy() for _ in dead]
        for d in dead:
            self.violation("decoy died", f"decoy pid {d.pid} ended with {d.returncode}: "
                           "buck signalled a process that is not buckd")

    def check_duplicates(self, elapsed):
        """Two running (not stopped) buckd for one dir: a violation once it lasts > 3 s."""
        by_dir = collections.defaultdict(list)
        for pid, p in self.buckds().items():
            self.seen_buckds.add(pid)
            if p.state not in "Tt":
                by_dir[isolation_of(p.argv)].append(pid)
        for iso in ISOLATION_DIRS:
            before = self.dup_time[iso]
            self.dup_time[iso] = before + elapsed if len(by_dir[iso]) > 1 else 0.0
            self.longest_dup = max(self.longest_dup, self.dup_time[iso])
            if before <= DUPLICATE_LIMIT < self.dup_time[iso]:
                replaced = self.dirs[iso] in self.replaced
                self.violation("two buckd for one dir", f"{iso}: pids {sorted(by_dir[iso])} "
                               f"for > {DUPLICATE_LIMIT:g} s (buckd.pid replaced: {replaced})")

    # --- the run and its end

    def run(self):
        self.deadline = time.monotonic() + self.opts.seconds
        thread = lambda loop, *args: threading.Thread(target=self.guarded, args=(loop, *args),
                                                      daemon=True)
        self.workers = [thread(self.work, random.Random(f"{self.opts.seed}-{i}"))
                        for i in range(self.opts.workers)]
        self.monitor_thread = thread(self.monitor)
        for t in self.workers + [thread(self.inject_faults, random.Random(self.opts.seed)),
                                 self.monitor_thread]:
            t.start()
        self.halt.wait(self.opts.seconds)

    def stop_workers(self, hurry):
        """No new clients; those running get their bound (none if hurried); SIGCONT all."""
        self.halt.set()
        end = time.monotonic() + (0 if hurry else CLIENT_BOUND + 5)
        while any(t.is_alive() for t in self.workers):
            if time.monotonic() > end:
                for proc in self.live_clients():
                    self.send(proc.pid, signal.SIGKILL)
            for t in self.workers:
                t.join(0.5)
        for pid in list(self.stopped):
            self.send(pid, signal.SIGCONT)

    def wind_down(self, hurry):
        """The final `kill`s, the decoys, then any process left with our HOME: a violation."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not skip this
        self.stop_workers(hurry)
        buck.poll(lambda: not self.launchers(), 5, 0.05)   # orphaned starts end first
        budget_end = time.monotonic() + FINAL_BUDGET
        for iso in ISOLATION_DIRS:
            for script in (self.buck, self.other):
                bound = max(1.0, budget_end - time.monotonic())
                self.finish(self.spawn(script, iso, ["kill"], "final kill"), bound)
        self.quiet.set()
        self.monitor_thread.join()
        for d in self.decoys:
            d.kill()
            d.wait()
        leftovers = [] if buck.poll(lambda: not self.scan(), 5, 0.05) else self.scan()
        for p in leftovers:
            self.send(p.pid, signal.SIGKILL)
            argv = b" ".join(p.argv).decode(errors="replace")
            self.violation("left running", f"pid {p.pid}: {argv}")

    def lifecycle_check(self):
        """lifecycle.check() over the log."""
        if not os.path.exists(self.log):
            self.check_lost_daemons([])
            return "skipped: no log written"
        try:
            lines = lifecycle.load(self.log)
            self.check_lost_daemons(lines)
            found = lifecycle.check(lines, killed=set(self.killed))
        except Exception as e:
            self.violation("lifecycle checker failed", repr(e))
            return "failed"
        ours = [v for v in found if re.search(r"guarantee[ _-]?1\b", v, re.I)
                and any(d in v for d in self.replaced)]
        for v in found:
            if v not in ours:
                self.violation("lifecycle", v)
        kept = ""
        if len(found) > len(ours) or self.violations:   # keep the evidence: the temp dir goes
            kept = os.path.join(tempfile.gettempdir(), f"chaos-seed{self.opts.seed}.log")
            shutil.copy(self.log, kept)
            kept = f"; the log is kept in {kept}"
        return f"{len(found)} violations, {len(ours)} skipped (guarantee 1, buckd.pid replaced){kept}"

    def report(self, checked):
        out = [f"chaos: seed {self.opts.seed}, {self.opts.seconds:g} s, "
               f"{self.opts.workers} workers, bursts {self.opts.burst}x{self.opts.burst_sleep:g}s, "
               f"buck {self.versions[self.buck]} (a copy of {self.opts.buck}), "
               f"other {self.versions[self.other]}",
               *self.notes, "actions (clients: exit 0 / 1 / 130 after Ctrl-C / SIGKILLed / other):"]
        for action in [*ACTIONS, "final kill"]:
            n = [self.outcomes[action, o] for o in ("0", "1", "130", "killed", "other")]
            out.append(f"  {action:10} {self.actions[action] or sum(n):4} runs {sum(n):4} clients: "
                       + " / ".join(map(str, n)))
        out.append("faults: " + ", ".join(f"{f} {n}" for f, n in sorted(self.faults.items())))
        out.append(f"buckd processes seen: {len(self.seen_buckds)}; longest two ran for one "
                   f"dir: {self.longest_dup:.1f} s (limit {DUPLICATE_LIMIT:g} s)")
        for title, counter in (("failure messages (exit 1)", self.failures),
                               ("other buck: lines", self.notices)):
            out.append(f"{title}: {sum(counter.values())}")
            out += [f"  {n:5}  {line}" for line, n in counter.most_common(12)]
            if len(counter) > 12:
                out.append(f"  ... and {len(counter) - 12} other messages")
        out.append(f"lifecycle check: {checked}")
        total = sum(map(len, self.violations.values()))
        out.append(f"VIOLATIONS: {total}" if total else "violations: none")
        for kind, details in self.violations.items():
            out += [f"  {kind}: {len(details)}", *(f"    - {d}" for d in details[:3])]
        return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--buck", default=lifecycle.BUCK)
    parser.add_argument("--burst", type=int, default=20, help="clients in a burst (20; more "
                        f"than buckd.MAX_COMMANDS, {buckd.MAX_COMMANDS}, makes buckd busy)")
    parser.add_argument("--burst-sleep", type=float, default=1, help="their debug sleep (1 s)")
    opts = parser.parse_args(argv)
    opts.buck = os.path.abspath(opts.buck)
    if not sys.platform.startswith("linux") or importlib.util.find_spec("grpc") is None:
        sys.exit("chaos: needs Linux and a Python with grpc (.venv/bin/python)")
    soak = Soak(opts)
    checked, hurry = "skipped: no run", True
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # clean up as on Ctrl-C
    try:
        soak.setup()
        soak.run()
        hurry = False
    except KeyboardInterrupt:
        soak.notes.append("INTERRUPTED by Ctrl-C: a partial run")
    finally:
        try:
            if soak.workers:
                soak.wind_down(hurry)
                checked = soak.lifecycle_check()
        finally:
            for d in soak.decoys:
                d.kill()
            shutil.rmtree(soak.tmp, ignore_errors=True)
    if not soak.workers:
        return 130                  # interrupted during the setup: nothing ran
    print(soak.report(checked))
    return 1 if soak.violations else 130 if hurry else 0


if __name__ == "__main__":
    sys.exit(main())
