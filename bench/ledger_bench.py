"""What poison isolation's crash ledger costs at bucket scale: round trips per second one ledger takes.

    python bench/ledger_bench.py --callers 4 --seconds 10

Each decode work item makes one round trip to the ledger (``begin``, waited for) and sends one message
(``end``); model actors use it only after a restart (``bitray.embed.isolation``). Work items hold up to
8,192 images (a manifest part), at least 128 (four batches of 32) in small runs. ``--callers`` Ray tasks
make begin/end pairs as decode tasks do, for ``--seconds``; the report projects the ledger's busy time for
100M images and the image rate one ledger keeps up with at the smallest and the largest work items.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ray

from bitray.embed.isolation import start_ledger
from bitray.embed.manifest import PART_ROWS

SMALLEST_ITEM = 4 * 32


@ray.remote(num_cpus=0.5)
def decode_items(ledger, seconds: float, caller: int) -> list[float]:  # noqa: ANN001 - an actor handle
    """Begin (waited for) and end pairs for ``seconds``, as decode tasks make them; the round trips' times."""
    times, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        key = f"decode:{caller}:{len(times)}"
        started = time.perf_counter()
        ray.get(ledger.begin.remote(key))
        times.append(time.perf_counter() - started)
        ledger.end.remote(key)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    ray.init(num_cpus=max(2, args.callers), include_dashboard=False, log_to_driver=False)
    ledger = start_ledger()
    ray.get(ledger.begin.remote("warm-up"))
    started = time.monotonic()
    per_caller = ray.get([decode_items.remote(ledger, args.seconds, c) for c in range(args.callers)])
    elapsed = time.monotonic() - started
    times = sorted(t for caller in per_caller for t in caller)
    rate = len(times) / elapsed
    items_100m = -(-100_000_000 // PART_ROWS)
    report = {
        "callers": args.callers,
        "round_trips": len(times),
        "round_trips_per_s": round(rate),
        "round_trip_ms_p50": round(1000 * statistics.median(times), 3),
        "round_trip_ms_p99": round(1000 * times[int(0.99 * len(times))], 3),
        "at_100M_images": {"work_items": items_100m, "ledger_seconds_busy": round(items_100m / rate, 1)},
        "images_per_s_one_ledger_keeps_up_with": {
            f"items_of_{SMALLEST_ITEM}": round(rate * SMALLEST_ITEM),
            f"items_of_{PART_ROWS}": round(rate * PART_ROWS),
        },
    }
    print(json.dumps(report, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
