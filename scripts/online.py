"""Whether this machine can reach the hosts the pipeline downloads from (exit 0) or not (exit 1, with the reason), by a
quick TCP connection to port 443. NANOCHAT_OFFLINE=1 answers "offline" without trying (tests, or forcing the stand-ins).

    python -m scripts.online [HOST ...]     # default: huggingface.co (FineWeb-edu shards, chat and eval datasets)
"""
import os
import socket
import sys

HOSTS = ["huggingface.co"]


def reachable(host: str, timeout: float = 5.0) -> str | None:
    """None when host:443 accepts a connection, else why not."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host}: {type(e).__name__}: {e}"


def main(argv=None) -> int:
    if os.environ.get("NANOCHAT_OFFLINE") == "1":
        print("offline: NANOCHAT_OFFLINE=1", file=sys.stderr)
        return 1
    hosts = (sys.argv[1:] if argv is None else argv) or HOSTS
    failures = [f for f in map(reachable, hosts) if f]
    for failure in failures:
        print(f"unreachable: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
