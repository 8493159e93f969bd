#!/usr/bin/env python3
"""Writes BENCHMARKS.md (to stdout) from the results of `make bench`: criterion's estimates
under target/criterion, the allocation counts printed by the transcode benchmark, and the
end-to-end results in target/bench/e2e.json. The notes at the end come from
scripts/benchmarks-notes.md (hand-written: profiles, history, what is not measured)."""

import datetime
import json
import os
import platform
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRIT = os.path.join(ROOT, "target", "criterion")
OUT = os.path.join(ROOT, "target", "bench")

MIB = 1024 * 1024


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // (1024 * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} vCPU {model}, {mem} GiB, {platform.system()} {platform.release()}"


def commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def estimate(group, name):
    """(mean ns per iteration, throughput bytes per iteration) or None."""
    base = os.path.join(CRIT, group, name, "new")
    try:
        with open(os.path.join(base, "estimates.json")) as f:
            mean = json.load(f)["mean"]["point_estimate"]
        with open(os.path.join(base, "benchmark.json")) as f:
            tp = (json.load(f).get("throughput") or {}).get("Bytes")
        return mean, tp
    except (OSError, KeyError, ValueError):
        return None


def faults_row(e):
    """The page-fault row of an end-to-end table (absent from results older than the measure)."""
    f = e.get("worker_minor_faults_per_message")
    if f is None:
        return "| worker minor page faults per message | not measured |"
    return f"| worker minor page faults per message (memory touched afresh, paid in system time) | {f:.2f} |"


def rss_row(e):
    """The peak-RSS row, with the peak heap in use where measured (the rest is the allocator's
    kept and fragmented memory, thread stacks and the binary)."""
    rss = e["worker_peak_rss_mib"]
    heap = e.get("worker_peak_heap_mib")
    if heap is None:
        return f"| **worker peak RSS** | **{rss:.0f} MiB** |"
    return (f"| **worker peak RSS** | **{rss:.0f} MiB**; at most {heap:.0f} MiB of it allocated at once "
            f"(the rest: memory the allocator kept after frees, fragmentation, thread stacks, the binary) |")


def allocations():
    out = {}
    try:
        with open(os.path.join(OUT, "criterion.txt")) as f:
            for line in f:
                m = re.match(r"(\S+): ([0-9.]+) allocations per message", line.strip())
                if m:
                    out[m.group(1)] = float(m.group(2))
    except OSError:
        pass
    return out


def ratios():
    """Compression ratios printed by the sinks benchmark: name -> "2.70x smaller"."""
    out = {}
    try:
        with open(os.path.join(OUT, "criterion.txt")) as f:
            for line in f:
                m = re.match(r"archive (\S+): .*\(([0-9.]+x) smaller\)", line.strip())
                if m:
                    # "group/name", or "name" alone from runs before the ≈ 1 KiB group.
                    name = m.group(1)
                    if name.startswith("archive_parquet_zstd3_25000_msgs/"):
                        name = name.split("/", 1)[1]
                    out[name] = f"{m.group(2)} smaller than the payload"
    except OSError:
        pass
    return out


def row(group, name, label, messages, allocs=None):
    e = estimate(group, name)
    if e is None:
        return f"| {label} | not run | | |"
    ns, tp = e
    mibs = tp / MIB / (ns / 1e9) if tp else 0
    per = ns / 1000 / messages
    a = "" if allocs is None else allocs if isinstance(allocs, str) else f"{allocs:.2f}"
    return f"| {label} | {mibs:.0f} MiB/s ({mibs * MIB / 1e6:.0f} MB/s) | {per:.2f} µs | {a} |"


def when_of(k):
    return datetime.datetime.fromtimestamp(k["unix_time"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def other_mix(name, intro, extra=lambda k: []):
    """The table of an end-to-end run on another mix, or nothing if it did not run."""
    try:
        with open(os.path.join(OUT, name)) as f:
            k = json.load(f)
        kmb = k.get("mean_batch") or {}
        return [
            intro(k),
            "",
            "| measure | value |",
            "|---|---|",
            f"| messages (malformed) | {k['messages']:,} ({k['malformed']:,}), {k['mean_payload_bytes']:.0f} B per message on average |",
            f"| worker CPU (user + system) | {k['worker_cpu_user_seconds']:.1f} s + {k['worker_cpu_system_seconds']:.1f} s |",
            f"| **worker CPU per message** | **{k['worker_cpu_us_per_message']:.1f} µs** |",
            f"| **payload per worker CPU-second** | **{k['payload_mb_per_cpu_second']:.1f} MB/s** |",
            rss_row(k),
            f"| worker heap allocations per message | {k['worker_allocations_per_message']:.1f} |"
            if k.get("worker_allocations_per_message") is not None else "| worker heap allocations per message | not counted |",
            faults_row(k),
            *extra(k),
            f"| wall time to drain | {k['drain_wall_seconds']:.0f} s |",
            f"| redeliveries / archive duplicates / BigQuery duplicate rows | {k['redelivered_extra']:,} / {k['archive_duplicates']:,} / {k['bigquery_duplicate_rows']:,} |",
            f"| mean rows per BigQuery request | {kmb.get('logflow_bigquery_batch_rows', 0):.0f} |",
            "",
        ]
    except (OSError, ValueError, KeyError):
        return []


def main():
    allocs = allocations()
    sizes = ratios()
    a = "archive_parquet_zstd3_25000_msgs"
    k = "archive_parquet_kib_25000_msgs"
    t = "transcode_sample_mix_3000_msgs"
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`scripts/bench.sh`, then `scripts/bench-report.py`); do not edit",
        "by hand, edit `scripts/benchmarks-notes.md` for the notes at the end.",
        "",
        f"- machine: {machine()}",
        f"- written: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"at commit {commit()}, from criterion's latest results and the latest end-to-end run "
        "(its commit is given with it)",
        "",
        "## Transcoding: protobuf payload → BigQuery insertAll row JSON",
        "",
        "`crates/logflow/benches/transcode.rs`: 3,000 messages of the sample mix (1,000 each of",
        "`HttpAccessLog`, `PaymentEvent`, `AuthEvent` from the `logflow publish` generator), each",
        "turned into a complete row with the six metadata columns. Throughput in protobuf input",
        "bytes, one core.",
        "",
        "| path | throughput | per message | allocations per message |",
        "|---|---|---|---|",
        row(t, "wire", "wire transcoder (`RowEncoder::encode`, what the worker runs)", 3000,
            allocs.get(f"{t}/wire")),
        row(t, "dynamic_message_reference",
            "prost-reflect `DynamicMessage` decode + our JSON writer (the reference)", 3000,
            allocs.get(f"{t}/dynamic_message_reference")),
        row(t, "prost_serde_ceiling",
            "prost-generated structs + serde_json (compiled-in types; simpler JSON)", 3000,
            allocs.get(f"{t}/prost_serde_ceiling")),
        "",
        "## Sinks",
        "",
        "`crates/logflow/benches/sinks.rs`, on the same mix. Throughput in protobuf payload bytes.",
        "",
        "| work | throughput | per message | object size |",
        "|---|---|---|---|",
        row(a, "encode", "raw-archive object: 25,000 records → Parquet, zstd level 3 (default)",
            25000, sizes.get("encode")),
        row(a, "encode_zstd1", "the same, `archive.zstd_level: 1`", 25000,
            sizes.get("encode_zstd1")),
        row(a, "encode_zstd2", "the same, `archive.zstd_level: 2`", 25000,
            sizes.get("encode_zstd2")),
        row(a, "encode_ndjson_zst", "the same, `archive.format: ndjson_zst` (base64 payloads), level 3",
            25000, sizes.get("encode_ndjson_zst")),
        row(k, "encode", "raw-archive object of ≈ 1 KiB messages (the end-to-end mix), level 3",
            25000, sizes.get(f"{k}/encode")),
        row(k, "encode_zstd1", "the same, level 1", 25000, sizes.get(f"{k}/encode_zstd1")),
        row(k, "encode_zstd2", "the same, level 2", 25000, sizes.get(f"{k}/encode_zstd2")),
        row("insert_all_body_500_rows", "build",
            "insertAll request body from 500 pre-serialised rows", 500),
        row("append_rows_500_rows", "convert",
            "Storage Write API: 500 row JSONs → protobuf rows of the writer schema", 500),
        "",
    ]
    try:
        with open(os.path.join(OUT, "e2e.json")) as f:
            e = json.load(f)
    except (OSError, ValueError):
        e = None
    lines += ["## End to end: Pub/Sub emulator → worker → GCS and BigQuery emulators", ""]
    if e is None:
        lines += ["Not run.", ""]
    else:
        emu = e.get("emulator_cpu_seconds", {})
        emu_s = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(emu.items()))
        allocs_e2e = e.get("worker_allocations_per_message")
        when = e.get("date") or (
            datetime.datetime.fromtimestamp(e["unix_time"], datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            if e.get("unix_time") else "unknown date")
        mix = e.get("mix", "sample")
        lines += [
            f"Measured at commit {e.get('commit') or 'unknown'}, {when}, on "
            + ("≈ 1 KiB messages, the size #9's goals are stated for: HTTP access logs with every "
               "request header and a browser's whole cookie, one table."
               if mix == "kib" else
               "the sample mix: three types, routed by attribute to a table each."),
            "",
            "`integration-tests/benches/e2e.rs`: a backlog published to the Pub/Sub emulator, drained",
            "by the release `logflow run` binary (default batching and flow control, "
            f"{e['streams']} streams), then every message",
            "accounted for: all in the raw archive, each valid one in BigQuery, each malformed one",
            "in the dead letters. CPU time is the worker's own (`getrusage` at exit); the emulators",
            "share the two cores and set the wall time.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| messages (malformed) | {e['messages']:,} ({e['malformed']:,}) |",
            f"| payload | {e['payload_bytes'] / 1e6:.0f} MB, {e['mean_payload_bytes']:.0f} B per message on average |",
            f"| worker CPU (user + system) | {e['worker_cpu_user_seconds']:.1f} s + {e['worker_cpu_system_seconds']:.1f} s |",
            f"| **worker CPU per message** | **{e['worker_cpu_us_per_message']:.1f} µs** per published message; "
            f"{(e['worker_cpu_user_seconds'] + e['worker_cpu_system_seconds']) * 1e6 / max(e['received'], 1):.1f} µs per delivery received ({e['received']:,}, redeliveries included); "
            f"**{e['worker_cpu_us_per_message'] * 1024 / e['mean_payload_bytes']:.1f} µs per KiB** of payload |",
            f"| **payload per worker CPU-second** | **{e['payload_mb_per_cpu_second']:.1f} MB/s** |",
            rss_row(e),
            f"| worker heap allocations per message | {allocs_e2e:.1f} |" if allocs_e2e is not None
            else "| worker heap allocations per message | not counted |",
            faults_row(e),
            f"| most messages held at once (seen on /metrics) | {e['peak_outstanding_seen']:,} |",
            f"| wall time to drain | {e['drain_wall_seconds']:.0f} s (publishing took {e['publish_seconds']:.0f} s) |",
            f"| emulators' CPU while draining | {emu_s} |",
            f"| redeliveries received (beyond one per message) | {e['redelivered_extra']:,} |",
            f"| archive duplicates / BigQuery duplicate rows | {e['archive_duplicates']:,} / {e['bigquery_duplicate_rows']:,} |",
            f"| stream re-opens | {e['stream_reopens']} |",
        ]
        mb = e.get("mean_batch") or {}
        if mb:
            lines += [
                f"| mean rows per BigQuery request / messages per archive object | "
                f"{mb.get('logflow_bigquery_batch_rows', 0):.0f} / {mb.get('logflow_archive_batch_messages', 0):,.0f} |",
            ]
            if "logflow_source_burst_messages" in mb:
                lines += [
                    f"| mean messages the source hands the stages at once (what the streams had ready) | "
                    f"{mb['logflow_source_burst_messages']:.1f} |",
                ]
            if "logflow_source_held_seconds" in mb:
                lines += [
                    f"| mean time the worker holds a message, receipt to ack (set by the emulators' pace "
                    f"and the archive's 25,000-message objects) | {mb['logflow_source_held_seconds']:.1f} s |",
                ]
        fl = e.get("floor")
        if fl:
            worker_us = e['worker_cpu_us_per_message']
            lines += [
                f"| **Pub/Sub client floor**: receive and ack only, same client, streams and flow control "
                f"({fl['messages']:,} messages, drained in {fl['wall_seconds']:.0f} s) | "
                f"**{fl['cpu_us_per_message']:.1f} µs** per message "
                f"({fl['cpu_user_seconds']:.1f} s + {fl['cpu_system_seconds']:.1f} s); "
                f"the worker's own work above it: {worker_us - fl['cpu_us_per_message']:.1f} µs; "
                f"the worker costs **{worker_us / fl['cpu_us_per_message']:.2f}× the floor** (the figure to compare across runs: "
                "this shared machine's speed varies by ±20 % from hour to hour) |",
            ]
        lines += [""]
    lines += other_mix(
        "e2e-sample.json",
        lambda k: f"**On the sample mix** (`BENCH_MIX=sample`, {k['messages']:,} messages; commit {k.get('commit')}, {when_of(k)}): "
        "the three types `logflow publish` sends (HTTP access logs, payment and auth events), "
        "routed by attribute to a table each; otherwise the same settings. Smaller messages, so "
        "the per-message costs weigh more per byte.",
    )
    lines += other_mix(
        "e2e-4kib.json",
        lambda k: f"**On ≈ 4 KiB messages** (`BENCH_MIX=4kib`, {k['messages']:,} messages; commit {k.get('commit')}, {when_of(k)}): "
        "the same access logs with a long cookie. Here the byte budget of flow control "
        "(`max_outstanding_bytes`, 64 MiB) binds before the message count, so this is the "
        "peak memory of a worker whose budget is full of large messages.",
        extra=lambda k: [
            f"| most messages held at once (seen on /metrics) | {k['peak_outstanding_seen']:,} |",
            f"| worker CPU per KiB of payload | {k['worker_cpu_us_per_message'] * 1024 / k['mean_payload_bytes']:.1f} µs |",
        ],
    )
    try:
        with open(os.path.join(OUT, "e2e-1m.json")) as f:
            m = json.load(f)
        lines += [
            f"A run with a {m['messages']:,}-message backlog of the "
            + ("≈ 1 KiB messages" if m.get("mix") == "kib" else "sample mix")
            + f" (`BENCH_MESSAGES={m['messages']}`, otherwise the same settings) checks that memory "
            "is bounded by flow control, not by the backlog:",
            "",
            "| measure | value |",
            "|---|---|",
            f"| **worker peak RSS** | **{m['worker_peak_rss_mib']:.0f} MiB** (most held at once: {m['peak_outstanding_seen']:,}) |",
            f"| worker CPU per message | {m['worker_cpu_us_per_message']:.1f} µs |",
            f"| wall time to drain | {m['drain_wall_seconds']:.0f} s |",
            f"| every message accounted for | yes ({m['bigquery_rows']:,} rows, {m['dead_letters']:,} dead letters) |",
            "",
        ]
    except (OSError, ValueError, KeyError):
        pass
    try:
        with open(os.path.join(ROOT, "scripts", "benchmarks-notes.md")) as f:
            lines += [f.read().rstrip(), ""]
    except OSError:
        pass
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    main()
