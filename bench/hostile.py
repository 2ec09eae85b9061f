"""Hostile input (issue 14): what each attack costs the process under attack.

    .venv/bin/python bench/hostile.py [--work runs/bench/hostile] [--trickle-seconds 20]

Per case: wall time, peak RSS of the process under attack and its answer, against the same
measurement of a valid input of normal size in the same run (the baseline):

- ``recjob validate`` (child; ru_maxrss): a billion-laughs alias bomb (depth 9) before the
  search sample, a 50 MB file of RecJobs; baseline: examples/recjob-search.yaml;
- ``recjob-serve serve`` on ``common.small_repository`` with ``--max-body-bytes`` 64 MiB
  (so the 16 MB text reaches the tokenizer; RSS: psutil every 10 ms, children included):
  a 16 MB text to the raw-text ensemble (baseline: a product title), a 135 MB body
  announced by Content-Length, sent until the server answers, and 300 half-open
  connections (200 half-sent headers, 50 half-sent bodies, 50 silent) with valid requests
  meanwhile (baseline: a valid token request); then the fixed valid requests again, whose
  scores must equal those before the attacks;
- one analysis, ``PrometheusSource.read`` (child), against a Prometheus trickling a valid
  answer over ``--trickle-seconds`` (each byte well within any per-read timeout): bounded
  by the analysis's deadline (``ANALYSIS_SECONDS``, 10 s) rather than by the server.

Bounded: under 1 s and +50 MB over the baseline (half-open: all closed within the longest
server timeout + 2 s; the Prometheus analysis: within its deadline + 1 s). Writes
bench/results/hostile.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
from common import BIN, served, small_repository

from recjob_operator.prometheus import ANALYSIS_SECONDS
from recjob_serving.limits import ServerLimits

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEARCH = REPO / "examples" / "recjob-search.yaml"
MB, MAX_BODY = 1e6, 64 << 20
TITLE = "dewalt 20v max cordless drill driver kit"
PROMETHEUS_ANSWER = b'{"status":"success","data":{"resultType":"scalar","result":[0,"0.5"]}}'


def alias_bomb(depth: int = 9) -> str:
    """Billion laughs: each level a list of nine aliases of the one before."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


#: Runs ``argv[1:]`` in a forked child and prints that child's peak RSS (KiB) last. Started
#: straight from this bench, a command would count the bench's own peak as its own (Linux
#: carries the peak RSS of the address space it replaces at ``execve`` into ``ru_maxrss``);
#: forked from this small launcher, its count starts from its own pages.
PEAK_RSS_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"\\npeak_rss_kib={usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def child(command: list[str]) -> dict:
    """Run ``command``: wall seconds, its own peak RSS (MB), exit code and first output line."""
    started = time.perf_counter()
    launcher = [sys.executable, "-c", PEAK_RSS_LAUNCHER, *command]
    process = subprocess.run(launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    output, _, peak = process.stdout.decode(errors="replace").rpartition("\npeak_rss_kib=")
    first = next((line.strip() for line in output.splitlines() if line.strip()), "")
    answer = f"exit {process.returncode}: {first[:110]}"
    return {"seconds": seconds, "peak_mb": int(peak) * 1024 / MB, "answer": answer}


@contextmanager
def sampled(pid: int):
    """Peak RSS (MB) of ``pid`` and its children while the block runs: ``out["peak_mb"]``."""
    process, stop, out = psutil.Process(pid), threading.Event(), {"peak_mb": 0.0}

    def sample() -> None:
        while True:
            try:
                rss = sum(p.memory_info().rss for p in [process, *process.children(True)])
                out["peak_mb"] = max(out["peak_mb"], rss / MB)
            except psutil.Error:
                pass
            if stop.wait(0.01):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()


def post(port: int, path: str, length: int, chunks, timeout: float = 120) -> dict:
    """POST ``chunks`` (``length`` announced) on a fresh connection as a client would,
    stopping once the server answers: seconds, HTTP status, answer, bytes sent, JSON."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")  # fmt: skip
    started, sent, data = time.perf_counter(), 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        with selectors.DefaultSelector() as selector:
            selector.register(connection, selectors.EVENT_READ)
            try:
                connection.sendall(head.encode())
                for chunk in chunks:
                    if selector.select(timeout=0):
                        break  # answered before the whole body was sent
                    connection.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
        try:
            while part := connection.recv(1 << 16):
                data += part
        except ConnectionResetError:
            pass
    seconds = time.perf_counter() - started
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    try:
        decoded = json.loads(data.partition(b"\r\n\r\n")[2])
    except ValueError:
        decoded = None
    error = decoded.get("error", "") if isinstance(decoded, dict) else ""
    answer = f"HTTP {status}" + (f": {error[:90]}" if error else "")
    return {"seconds": seconds, "status": status, "answer": answer, "sent_bytes": sent,
            "json": decoded}  # fmt: skip


def text_request(item: str) -> bytes:
    def text(name: str, value: str) -> dict:
        return {"name": name, "datatype": "BYTES", "shape": [1, 1], "data": [value]}

    return json.dumps({"inputs": [text("query", "cordless drill"), text("item", item)]}).encode()


TOKENS = json.dumps({"inputs": [
    {"name": name, "datatype": "INT64", "shape": [1, 4], "data": [value] * 4}
    for name, value in (("input_ids", 1000), ("attention_mask", 1), ("token_type_ids", 0))
]}).encode()  # fmt: skip
VALID = {"token model": ("/v2/models/search/infer", TOKENS),
         "text ensemble": ("/v2/models/search-text/infer", text_request(TITLE))}  # fmt: skip


def yaml_rows(work: Path) -> list[dict]:
    """``recjob validate`` on the alias bomb and a 50 MB file, vs the search sample."""
    sample = SEARCH.read_text()
    bomb, big = work / "alias-bomb.yaml", work / "big-50MB.yaml"
    bomb.write_text(alias_bomb() + sample)
    copies = 50_000_000 // len(sample.encode()) + 1
    big.write_text("---\n".join([sample] * copies))
    validate = [str(BIN / "recjob"), "validate"]
    baseline = child([*validate, str(SEARCH)])
    return [
        row("alias bomb, depth 9 (validate)", child([*validate, str(bomb)]), baseline,
            f"{bomb.stat().st_size} bytes, 9^9 lists once expanded"),
        row("50 MB RecJob file (validate)", child([*validate, str(big)]), baseline,
            f"{big.stat().st_size / MB:.1f} MB, {copies} documents"),
    ]  # fmt: skip


def server_rows(work: Path, header_timeout: float, read_timeout: float) -> tuple[list, dict]:
    """The server cases, and whether the fixed valid requests answer identically after."""
    flags = ["--max-body-bytes", str(MAX_BODY), "--header-timeout", str(header_timeout),
             "--read-timeout", str(read_timeout)]  # fmt: skip
    with served(small_repository(work), work, *flags) as (server, http, _):
        text_path, token_path = VALID["text ensemble"][0], VALID["token model"][0]

        def valid(name: str) -> dict:
            return post(http, VALID[name][0], len(VALID[name][1]), [VALID[name][1]])

        def measured(action) -> dict:  # the result with the server's peak RSS meanwhile
            with sampled(server.pid) as rss:
                result = action()
            return {**result, "peak_mb": rss["peak_mb"]}

        for _ in range(3):  # warm-up: ORT arenas, tokenizer
            reference = {name: valid(name)["json"]["outputs"] for name in VALID}
        text_base = measured(lambda: valid("text ensemble"))
        item = "cordless drill driver kit " * (16_000_000 // 26)
        text, short = text_request(item), text_request(item[:1024])
        text_attack = measured(lambda: post(http, text_path, len(text), [text]))
        cut = post(http, text_path, len(short), [short])["json"]
        outputs = (text_attack["json"] or {}).get("outputs")
        token_base, size = measured(lambda: valid("token model")), 135_000_000

        def huge():
            yield b'{"inputs": ['
            yield from (b" " * (1 << 20) for _ in range(size >> 20))

        body_attack = measured(lambda: post(http, token_path, size, huge()))
        with sampled(server.pid) as rss:
            opened, meanwhile, closed, answers = half_open(http, lambda: valid("token model"))
        after = {name: valid(name)["json"]["outputs"] for name in VALID}
    bound = max(header_timeout, read_timeout) + 2
    closed_row = {"seconds": closed, "peak_mb": rss["peak_mb"], "answer": answers}
    rows = [
        row("16 MB text, one request (serve)", text_attack, text_base,
            f"{len(text) / MB:.1f} MB body; the text is cut before tokenizing"),
        row("135 MB body, Content-Length (serve)", body_attack, token_base,
            f"{body_attack['sent_bytes'] / MB:.1f} MB sent before the answer"),
        row("300 half-open: all closed by server", closed_row, token_base,
            f"{opened} opened; bound: the longest timeout + 2 s", bound=bound),
        row("valid request during 300 half-open", {**meanwhile, "peak_mb": rss["peak_mb"]},
            token_base, "the slowest of three; RSS: the whole half-open case"),
    ]  # fmt: skip
    identical = {name: after[name] == reference[name] for name in VALID}
    identical["16 MB text scored as its first 1024 bytes"] = outputs == cut["outputs"]
    return rows, {"flags": flags, "identical_after_attacks": identical}


def half_open(port: int, valid) -> tuple[int, dict, float, str]:
    """300 connections left half-sent (200 headers, 50 bodies) or silent (50); three valid
    requests meanwhile (the slowest kept); seconds from the last opened until the server
    closed them all, and what they got."""
    headers = b"POST /v2/models/search/infer HTTP/1.1\r\nHost: x\r\nContent-Ty"
    body = (b"POST /v2/models/search/infer HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b'application/json\r\nContent-Length: 1000\r\n\r\n{"inputs"')  # fmt: skip
    sockets: list[socket.socket] = []
    received, closed = {}, {}
    try:
        for i in range(300):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            if i < 250:
                sockets[-1].sendall(headers if i < 200 else body)
        opened, answers = time.perf_counter(), [valid() for _ in range(3)]
        meanwhile = {**max(answers, key=lambda a: a["seconds"]),
                     "answer": ", ".join(a["answer"] for a in answers)}  # fmt: skip
        with selectors.DefaultSelector() as selector:
            for connection in sockets:
                selector.register(connection, selectors.EVENT_READ)
                received[connection] = b""
            while len(closed) < len(sockets) and time.perf_counter() < opened + 300:
                for key, _ in selector.select(timeout=1):
                    try:
                        data = key.fileobj.recv(1 << 16)
                    except ConnectionResetError:
                        data = b""
                    received[key.fileobj] += data
                    if not data:
                        selector.unregister(key.fileobj)
                        closed[key.fileobj] = time.perf_counter()
    finally:
        for connection in sockets:
            connection.close()
    seconds = max(closed.values()) - opened if len(closed) == len(sockets) else float("inf")
    statuses = Counter(received[c][9:12].decode() or "none" for c in closed)
    kinds = ", ".join(f"{n}x HTTP {s}" for s, n in sorted(statuses.items()))
    return len(sockets), meanwhile, seconds, f"{len(closed)}/300 closed: {kinds}"


class Trickle(BaseHTTPRequestHandler):
    """A Prometheus answering a valid instant query one byte every ``server.delay`` s."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(PROMETHEUS_ANSWER)))
        self.end_headers()
        self.wfile.flush()
        for i in range(len(PROMETHEUS_ANSWER)):
            self.wfile.write(PROMETHEUS_ANSWER[i : i + 1])
            self.wfile.flush()
            time.sleep(self.server.delay)

    def log_message(self, *_) -> None:
        pass


QUERY = """import sys, time
from recjob_operator.api.v1alpha1.spec_delivery import MetricCheck
from recjob_operator.prometheus import PrometheusSource
check = MetricCheck(name="up", query='sum(up{revision="{{revision}}",namespace="{{namespace}}"})',
                    min=0)
source, started = PrometheusSource(sys.argv[1]), time.perf_counter()
(reading,) = source.read([check], {"revision": "shop-v2", "namespace": "shop"})
answer = f"error {reading.error}" if reading.error else f"value {reading.value}"
print(f"{time.perf_counter() - started:.4f} {answer}")
"""


def prometheus_row(trickle_seconds: float) -> dict:
    """The operator's query against a trickling Prometheus vs one answering at once."""
    prometheus = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=prometheus.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{prometheus.server_address[1]}"
    results = []
    try:
        for delay in (0.0, trickle_seconds / len(PROMETHEUS_ANSWER)):
            prometheus.delay = delay
            result = child([sys.executable, "-c", QUERY, url])
            code, _, line = result["answer"].partition(": ")  # the query's own time first
            seconds, _, answer = line.partition(" ")
            results.append({**result, "seconds": float(seconds), "answer": f"{code}: {answer}"})
    finally:
        prometheus.shutdown()
    return row("trickling Prometheus (one analysis)", results[1], results[0],
               f"one byte every {delay:.2f} s for {trickle_seconds:g} s (this bench's choice: "
               "an attacker's can be endless); bound: the analysis deadline + 1 s",
               bound=ANALYSIS_SECONDS + 1)  # fmt: skip


def row(case: str, result: dict, baseline: dict, detail: str, bound: float = 1.0) -> dict:
    """One table row: the case against its baseline, and whether it is bounded."""
    extra, seconds = result["peak_mb"] - baseline["peak_mb"], result["seconds"]
    return {
        "case": case, "seconds": round(seconds, 4),
        "baseline_seconds": round(baseline["seconds"], 4),
        "time_ratio": round(seconds / baseline["seconds"], 1),
        "peak_rss_mb": round(result["peak_mb"], 1),
        "baseline_peak_rss_mb": round(baseline["peak_mb"], 1),
        "rss_over_baseline_mb": round(extra, 1),
        "answer": result["answer"], "baseline_answer": baseline["answer"], "detail": detail,
        "bound": {"seconds": bound, "rss_over_baseline_mb": 50},
        "bounded": seconds <= bound and extra <= 50, "fixed": True,
    }  # fmt: skip


def table(rows: list[dict]) -> None:
    print(f"{'case':38} {'time s':>8} {'base s':>7} {'x':>7} {'peak MB':>8} {'base MB':>8} "
          f"{'+MB':>7}  bounded  answer")  # fmt: skip
    for r in rows:
        flag = ("yes" if r["bounded"] else "NO") + ("" if r["fixed"] else " (not fixed)")
        print(f"{r['case']:38} {r['seconds']:8.3f} {r['baseline_seconds']:7.3f} "
              f"{r['time_ratio']:7.1f} {r['peak_rss_mb']:8.1f} {r['baseline_peak_rss_mb']:8.1f} "
              f"{r['rss_over_baseline_mb']:7.1f}  {flag:8} {r['answer'][:70]}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench" / "hostile")
    parser.add_argument("--trickle-seconds", type=float, default=20.0)
    parser.add_argument("--header-timeout", type=float, default=ServerLimits.header_timeout)
    parser.add_argument("--read-timeout", type=float, default=ServerLimits.read_timeout)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "hostile.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = yaml_rows(args.work)
    served_rows, server = server_rows(args.work, args.header_timeout, args.read_timeout)
    rows += served_rows
    rows.append(prometheus_row(args.trickle_seconds))
    table(rows)
    print("identical after the attacks:", server["identical_after_attacks"])
    python = os.path.relpath(sys.executable, Path.cwd())
    document = {
        "command": shlex.join([python, *sys.argv]),
        "machine": {"cpus": os.cpu_count()},
        "server": server,
        "rows": rows,
        "notes": [
            "time: wall seconds of the process under attack answering (client side); "
            "half-open: from the last connection opened until the server closed all 300",
            "peak RSS: recjob validate and the Prometheus query run in a child process "
            "(ru_maxrss from wait4, forked from a small launcher); the server is sampled "
            "with psutil every 10 ms, "
            "children included; +MB is over the same measurement of the baseline",
            "trickling Prometheus: one deadline per analysis (ANALYSIS_SECONDS), enforced "
            "while the answer is read, so the analysis ends with an error reading at the "
            "deadline however slowly the server trickles",
        ],
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
