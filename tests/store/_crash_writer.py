"""A writer process for the crash-injection tests: appends the deterministic columns p<start>,
p<start+1>, ... to a store in a loop until it is killed. Prints ``ready`` once the store is open.

    python _crash_writer.py STORE START {append,compact} CYCLES [STORAGE_OPTIONS_JSON]

With ``compact`` it runs :meth:`LossStore.compact` after every append, so kills also land in compaction.
CYCLES > 0 stops after that many appends (to count their storage operations); 0 runs until killed (the
test kills it at a failpoint: DAUNCE_STORE_FAILPOINT).
"""

from __future__ import annotations

import json
import sys

from _support import column

import daunce_store


def main() -> None:
    url, start = sys.argv[1], int(sys.argv[2])
    compact = sys.argv[3] == "compact"
    cycles = int(sys.argv[4])
    options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    store = daunce_store.open(url, storage_options=options)
    m = store.query_sets()["test"]
    print("ready", flush=True)
    pid = start
    while cycles == 0 or pid < start + cycles:
        store.append(f"p{pid}", column(pid, store.n_train), {"test": column(pid, m, salt=1)}, metadata={"seed": pid})
        pid += 1
        if compact:
            store.compact()


if __name__ == "__main__":
    main()
