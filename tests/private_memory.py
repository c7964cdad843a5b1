"""Run train.py's main in this process and print how much private memory the run held:
`private_memory RANK BEFORE DURING` in kB, Private_Clean + Private_Dirty of /proc/self/smaps_rollup
(memory no other process shares: a copy of the data counts, page-cache pages that the processes of
a node map together do not) before the run and, at its largest, at the end of each log interval
(while the data is open). Used under torchrun by tests/test_data.py."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules

import train  # noqa: E402


def private_kb():
    fields = dict(line.split(":") for line in Path("/proc/self/smaps_rollup").read_text()
                  .splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


def measured(maintenance, during):
    def wrapper(*args, **kwargs):
        during.append(private_kb())
        return maintenance(*args, **kwargs)
    return wrapper


if __name__ == "__main__":
    before, during = private_kb(), []
    train.maintenance = measured(train.maintenance, during)
    train.main(sys.argv[1:])
    # one write, so that the lines of the two processes do not interleave
    sys.stdout.write(f"private_memory {os.environ.get('RANK', 0)} {before} {max(during)}\n")
    sys.stdout.flush()
