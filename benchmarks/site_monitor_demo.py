"""Feed a running server a stream of films, one request each, and print the site monitor's gauges
before and after (what `curl /metrics` shows): the monitor seen moving in a live server.

Usage: python benchmarks/site_monitor_demo.py --url http://127.0.0.1:8765 --model efficientnet_lite0 \
           --images FILE... (or --folder DIR --n 40)
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import requests


def gauges(url: str) -> str:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return "\n".join(li for li in text.splitlines() if li.startswith(("covid_cxr_shift", "covid_cxr_window")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    files = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:args.n]
    print("# before\n" + gauges(args.url))
    for p in files:
        body = {"instances": [{"b64": base64.b64encode(p.read_bytes()).decode()}]}
        r = requests.post(f"{args.url}/v1/models/{args.model}:predict", json=body, timeout=60)
        r.raise_for_status()
    print(f"\n# after {len(files)} films of {args.folder.name}\n" + gauges(args.url))
    mon = requests.get(f"{args.url}/v1/models/{args.model}/metadata", timeout=30).json()["metadata"]["site_monitor"]
    print(f"\n# metadata site_monitor: verdict {mon['verdict']}, n {mon['n']}, p {mon['p_value']:.2g}\n# {mon['summary']}")


if __name__ == "__main__":
    main()
