"""A writer process for the crash-injection tests: appends the deterministic columns p<start>,
p<start+1>, ... to a store in a loop until it is killed. Prints ``ready`` once the store is open.

    python _crash_writer.py STORE START {append,compact} [STORAGE_OPTIONS_JSON]

With ``compact`` it runs :meth:`LossStore.compact` after every append, so kills also land in compaction,
and prints ``compacting`` just before each call, so the test can aim a kill at one.
"""

from __future__ import annotations

import json
import sys

from _support import column

import daunce_store


def main() -> None:
    url, start = sys.argv[1], int(sys.argv[2])
    compact = sys.argv[3] == "compact"
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    store = daunce_store.open(url, storage_options=options)
    m = store.query_sets()["test"]
    print("ready", flush=True)
    pid = start
    while True:
        store.append(f"p{pid}", column(pid, store.n_train), {"test": column(pid, m, salt=1)}, metadata={"seed": pid})
        pid += 1
        if compact:
            print("compacting", flush=True)
            store.compact()


if __name__ == "__main__":
    main()
