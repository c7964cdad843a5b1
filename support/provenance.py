"""Where a number in docs/data/ came from: the command that made it, the commit it ran at, when
and for how long. Every command that writes a docs/data/*.json adds this record to it."""
import shlex
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit():
    """The checked-out commit, with '+dirty' when tracked files differ from it; 'unknown'
    outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command(head, argv):
    """The command line as a user types it: head ('python -m tools.table5', 'python train.py')
    and the arguments, quoted for a shell."""
    return " ".join([head, *(shlex.quote(str(a)) for a in argv)])


def record(head, argv, started):
    """{command, commit, started, wall_seconds} of a call that began at time.time() `started`."""
    return {"command": command(head, argv), "commit": commit(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "wall_seconds": round(time.time() - started, 1)}
