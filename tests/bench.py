#!/usr/bin/env python3
"""Benchmark dogestry push/pull, import/export, copy against floors measured in the same run (a script).

    python3 tests/bench.py [--size-mib 512] [--keep] [--repeat N] [--workdir DIR] [--s3 | --no-s3]
                           [--fleet | --no-fleet] [--startup-runs N] [--startup-only]
                           [--no-chunks | --chunks-only] [--chunk-size-mib 1024] [--chunks-s3]

Starts its own dockerd (unless DOCKER_HOST is set) in a temp dir on the same disk as the
stores, builds a FROM-scratch image of three roughly equal layers (random, text, mixed)
from a build context written in 4 MiB pieces, and measures:

  start-up  first, before any engine starts: python3 -c pass and dogestry.pyz version, help, a
            usage error (push without arguments) and list of a small directory store (one tiny
            image, imported), each --startup-runs times (21) in turns; targets on the medians'
            differences to python3 -c pass: <= +40 ms, list <= +80 ms (--startup-only: only this)
  floors    docker save > /dev/null; docker load of the saved tar after docker rmi (the
            layers are checked to be gone from the engine); gzip -1 of the saved tar on
            one thread and, the floor, in 2 MiB members on os.cpu_count() threads
            (also: only the layers dogestry would compress, for reference)
  dogestry  push to an empty store, re-push, push --compress none, pull after docker rmi
            (from the gzip store, and from the uncompressed one for reference); each runs
            as a subprocess whose CPU comes from wait4() and whose peak RSS is its VmHWM,
            polled every 2 ms (wait4's ru_maxrss would start at this script's own peak RSS,
            which a child started with vfork inherits)
  archives  import of the saved tar into an empty directory store (target <= 1.0x push: import
            needs no engine export), checked (its "Imported image" line, the tag, the config's
            digest, the manifest's layers, each blob's size) and pulled once after docker rmi;
            export -o FILE (on the work disk) of the image from the gzip store, docker format
            (target <= 1.1x docker save > file) and --format oci (reported); every archive is
            read to its end and checked (the config's digest is the image ID, the tag, each layer
            unpacks to its diffID, OCI blobs match their names; skopeo inspect reads the OCI
            one's config), and the docker one is docker load'ed after docker rmi (timed, for
            information: its layers are gzip, as stored) and must give the same image ID
  S3        (--s3, the default when radosgw is installed; --no-s3 skips it) a throw-away
            radosgw (tests/radosgw.py) and a bucket; floors: the bytes dogestry stores (the
            gzip store's blobs, concatenated into one object) PUT and GET in-process with
            dogestry.S3Client -- one signed PUT (payload sha256 computed beforehand, not
            timed), a multipart PUT of 8 MiB parts on 4 connections (part hashes beforehand),
            one GET, 8 MiB ranged GETs on 4 connections -- after an untimed warm-up round
            trip; then dogestry push to s3://BUCKET/bench/, re-push, pull after docker rmi;
            after the fleet's S3 stages, dogestry copy of the image from the gzip directory
            store to an empty prefix of the bucket (target <= 1.2x the multipart PUT floor) and
            from s3://BUCKET/bench/ to an empty prefix of another bucket on the same radosgw
            (server-side; one CopyObject of the floor object is timed for reference): target,
            the bytes through the machine -- radosgw's access log: GET answers, PUT/POST bodies
            (its get_b and put_b counters printed beside) -- < 1% of the image.  Each copy is
            checked (its "Copied NAME:TAG (ID)" line, the tag, the config's digest, the
            manifest's layers, each blob's size) and pulled once after docker rmi
  multi-platform  (with the fleet; --no-multiplatform skips it) buildah builds a two-platform
            image (this machine's architecture and the other of amd64/arm64: a shared layer and one
            of each platform's own, each a quarter of --size-mib); import of its two-platform OCI
            archive into an empty store against importing each platform's own archive into one
            store, one after the other; -pullhosts of the tag to two fleet hosts, one of them behind
            a relay whose GET /version reports the other architecture, against pulling each host its
            platform alone.  Targets: no slower than the single-platform work, every blob stored
            once and read from the store exactly once (inotify)
  fleet     (--fleet, the default; --no-fleet skips it) three more dockerds, each with its
            own dirs and a plain TCP listener on HOST:2375 (random loopback addresses), started for
            these stages; floor: docker load of the saved tar into one of them over TCP;
            then `dogestry -pullhosts tcp://HOST:2375 pull STORE IMAGE` (1 host) and
            the same with all three hosts, from the gzip directory store and (with S3) from
            the S3 store.  Before every run the image is removed from all three hosts and
            their layers are checked to be gone, so every host lacks every layer.  Bytes
            fetched from the store: for S3, radosgw's own access log (one line per request
            with the bytes it sent; its request counter says the log is complete, its get_b
            counter must agree); for the directory store, inotify IN_OPEN events on the
            store's blob, image and tag directories times the files' sizes (dogestry reads
            every blob it opens to the end, to verify it); for both, dogestry's "downloaded"
            progress lines mapped to the stored blob sizes as a cross-check.  3 hosts must
            fetch exactly the bytes 1 host does (the union of missing layers is downloaded
            once, and every blob exactly once): two targets per store
  chunks    (last; --no-chunks skips it, --chunks-only runs only it: no start-up stage, no bench
            image) sub-layer dedup, issue 23's scenarios, each image built FROM scratch by one
            `COPY` with docker build --no-cache (classic builder) and pushed with `push --json`
            into two directory stores: chunked (DOGESTRY_CHUNKS=1) and layer-level
            (DOGESTRY_CHUNKS=0: whole layers, today's dedup).  The tree: --chunk-size-mib (1024)
            MiB in ~3,000 files (sizes around 350 KiB; text, binary-ish code, incompressible),
            pushed first; A: 4 KiB rewritten in place in the middle of one 512 KiB text file,
            rebuilt, re-pushed; B: every mtime under the tree set anew, rebuilt, re-pushed; the
            image of B pulled back from each store after docker rmi (same image ID); C: one file
            of 500/1024 of --chunk-size-mib (random) pushed, then 1 KiB inserted at 40% of it,
            rebuilt, re-pushed.  Every re-push starts from the same store (a hard-linked copy
            is put back before each --repeat run; chunked and layer-level in turns), and docker
            save of the rebuilt image > /dev/null is timed for reference (no push is faster).
            For each push: bytes uploaded (--json bytes_sent, chunk bytes included), the
            store's growth (sum of file sizes after - before), objects written (files created
            or replaced in the store: what S3 would PUT), chunks new/found, seconds; and the
            objects per GiB of the tree's first push.  Targets: A uploads <= 2 MiB + the edited
            file and the store grows no more; B the same for <= 2% of the layer's tar; A's and
            B's re-push >= 3x faster than the layer-level one (the check prints the most any
            push can gain here: layer-level / docker save).  C is reported.  --chunks-s3: the
            first push, A and B again into radosgw (the S3 stage's, or one started for it),
            chunked and layer-level, with each push's requests by method from radosgw's access
            log and the requests per GiB of the first push; the 3x target again on S3

then prints a table (seconds, MB/s of the saved image, peak RSS, CPU of the process and of
dockerd+containerd, bytes fetched from the store by fleet pulls, ratio to the floor), the
targets with PASS/FAIL, and dogestry's own progress lines with timestamps.  --repeat N keeps
the best of N runs of every stage; the save and load floors are measured in turns with the
pushes and the pull judged against them.

Exit status 0 whether the targets pass or not; 1 if something failed to run (including a
pulled or loaded image whose ID differs, or an import, export or copy whose result does not
check out); 130 on Ctrl-C or SIGTERM.  Everything it started or created is removed at the
end, radosgw included (--keep keeps the work directory: stores, saved tar, exported archives,
dockerd and radosgw data and logs).  MB = 10^6 bytes, MiB = 2^20 bytes.
"""

import argparse
import concurrent.futures
import collections
import contextlib
import hashlib
import http.client
import importlib.util
import itertools
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import zlib
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdocker import (  # noqa: E402
    DOGESTRY, FIXED_MTIME, client_env, docker_cli, find_docker, image_id, loopback_addresses, random_bytes,
    remove_tree, small_save_archive, start_dockerd, text_bytes,
)
from radosgw import RadosGWError, start_radosgw  # noqa: E402


MiB = 1 << 20
MB = 1000 * 1000
GEN_CHUNK = 4 * MiB       # data is generated and written this much at a time
FILE_SIZE = 32 * MiB      # each layer is split into files of at most this size
GZ_CHUNK = 2 * MiB        # dogestry's CHUNK_GZ: independent gzip members of this size
TAG = "dogestry-bench/image:%d" % os.getpid()

TARGET_PUSH_BOUND_RATIO = 1.15   # gzip push against the least time any push can take here (printed)
TARGET_RAW_PUSH_RATIO = 1.15     # --compress none push against docker save
TARGET_PULL_RATIO = 1.2
TARGET_RSS_MIB = 80
TARGET_REPUSH_S = 1.0
TARGET_IMPORT_RATIO = 1.0        # import of the saved tar against push (import needs no engine export)
TARGET_EXPORT_RATIO = 1.1        # export -o FILE against docker save > file
TARGET_COPY_PUT_RATIO = 1.2      # copy dir -> S3 against the multipart PUT floor of the same bytes
TARGET_COPY_THROUGH_SHARE = 0.01  # copy S3 -> S3 on one endpoint: of the image's bytes, what passes through

S3_PART = 8 * MiB         # dogestry's S3_MIN_PART and S3_RANGE: multipart part / ranged GET size
S3_STREAMS = 4            # dogestry's S3 workers: parallel parts / ranges per object
S3_PREFIX = "bench/"      # where dogestry's S3 store lives in the bucket
WARMUP_TOUCH = 1 << 30    # bytes of fresh memory touched once before the S3 stage (first-touch cost)

# the fleet's extra dockerds: random loopback addresses nothing listens on (no run collides with another)
FLEET_ADDRESSES = loopback_addresses(3)
FLEET_PORT = 2375
REGISTRY_PORT = 5000       # the reference registry's port (on an address of its own)
TARGET_REGISTRY_RATIO = 1.0   # docker pull through dogestry -server against docker-registry
GC_TAGS, GC_LAYERS = 2000, 10  # the gc stage's store: 2,000 tags and 20,000 small blobs
GC_GRACE = 130                 # seconds (and DOGESTRY_GC_MIN_GRACE): gc stops after half its grace; the target is 60 s
TARGET_GC_S = 60
TARGET_GC_REQUESTS = 3         # requests per deleted object
REGISTRY_LEVEL = 6            # the gzip level docker push uses: the registry target compares equal blobs
REGISTRY_PREFIX = "bench-registry/"  # the store pushed at that level, beside the S3 stage's
TARGET_REDIRECT_SHARE = 0.01  # of the image's bytes, what the dogestry server may send itself
TARGET_REGISTRY_PUSH_RATIO = 1.1  # docker push into dogestry -server (radosgw) against docker-registry on local disk
TARGET_SERVER_PUSH_RSS_MIB = 100  # the server's peak RSS while 4 docker pushes run at once
SERVER_PUSHES = 4
SERVER_PORT = 22375        # dogestry's server port: -pullhosts would delegate S3 pulls to servers there
BLOB_DIR = "blobs/sha256"  # where a dogestry store keeps its blobs
STARTUP_RUNS = 21          # the start-up stage: runs of each command, in turns
TARGET_STARTUP_MS = 40     # version, help, a usage error: median over python3 -c pass's
TARGET_STARTUP_LIST_MS = 80  # list of a small directory store: the same


class BenchError(RuntimeError):
    """Something the benchmark needs did not work (exit status 1)."""


def log(message):
    """A progress line of the benchmark itself."""
    print("[bench %7.1fs] %s" % (time.monotonic() - T0, message), flush=True)


T0 = time.monotonic()


# --- data and image ---------------------------------------------------------------------

_BINARYISH = bytes(0 if v < 128 else (v % 8) * 17 + 1 if v < 192 else v for v in range(256))


def binaryish_bytes(n, seed):
    """N bytes shaped like executable code: many zeros, a few common values, some noise."""
    return random_bytes(n, seed).translate(_BINARYISH)


def mixed_bytes(n, seed):
    """N bytes alternating 256 KiB of binary-ish data and 256 KiB of text."""
    parts, done, piece = [], 0, 256 * 1024
    while done < n:
        size = min(piece, n - done)
        maker = binaryish_bytes if (done // piece) % 2 == 0 else text_bytes
        parts.append(maker(size, seed * 1000003 + done))
        done += size
    return b"".join(parts)


LAYER_KINDS = (
    ("random", lambda n, seed: random_bytes(n, seed)),
    ("text", lambda n, seed: text_bytes(n, seed)),
    ("mixed", mixed_bytes),
)


def write_layer_files(layer_dir, kind, maker, total):
    """Write TOTAL bytes of KIND data under LAYER_DIR/KIND/ in FILE_SIZE files, GEN_CHUNK at a time."""
    data_dir = layer_dir / kind
    data_dir.mkdir(parents=True)
    written, index, seed = 0, 0, zlib.crc32(kind.encode()) & 0xFFFF
    while written < total:
        path = data_dir / ("part-%03d.bin" % index)
        file_size = min(FILE_SIZE, total - written)
        with open(str(path), "wb") as f:
            done = 0
            while done < file_size:
                n = min(GEN_CHUNK, file_size - done)
                f.write(maker(n, seed * 7919 + written + done))
                done += n
        os.chmod(str(path), 0o644)
        written += file_size
        index += 1
    for path in sorted(layer_dir.rglob("*"), reverse=True) + [layer_dir]:
        os.utime(str(path), (FIXED_MTIME, FIXED_MTIME))


def build_bench_image(host, workdir, size_bytes):
    """Write a streamed build context and `docker build` it; return the image ID."""
    ctx = Path(tempfile.mkdtemp(prefix="ctx", dir=str(workdir)))
    try:
        lines = ["FROM scratch"]
        third = size_bytes // 3
        for index, (kind, maker) in enumerate(LAYER_KINDS):
            total = third if index < 2 else size_bytes - 2 * third
            write_layer_files(ctx / ("l%d" % index), kind, maker, total)
            lines.append("COPY l%d/ /" % index)
        lines.append('LABEL org.dogestry.bench="%d MiB"' % (size_bytes // MiB))
        (ctx / "Dockerfile").write_text("\n".join(lines) + "\n")
        log("build context written (%d MiB); docker build ..." % (size_bytes // MiB))
        docker_cli(host, "build", "-q", "-t", TAG, str(ctx), timeout=900)
    finally:
        shutil.rmtree(str(ctx), ignore_errors=True)
    return image_id(host, TAG)



def chain_ids(diff_ids):
    """Layer chain IDs (how the engine names stacked layers)."""
    out = []
    for diff in diff_ids:
        out.append(diff if not out else
                   "sha256:" + hashlib.sha256(("%s %s" % (out[-1], diff)).encode()).hexdigest())
    return out


def engine_chains(host):
    """Chain IDs of every layer any image in the engine holds."""
    ids = docker_cli(host, "image", "ls", "-a", "-q", "--no-trunc").stdout.split()
    chains = set()
    if ids:
        docs = json.loads(docker_cli(host, "image", "inspect", *sorted(set(ids))).stdout)
        for doc in docs:
            chains.update(chain_ids((doc.get("RootFS") or {}).get("Layers") or []))
    return chains


def remove_image(host, ref, diff_ids, handle, missing_ok=False):
    """docker rmi REF and make sure the engine really dropped its layers (MISSING_OK: REF may be absent)."""
    if not missing_ok or image_id(host, ref) is not None:
        docker_cli(host, "rmi", "-f", ref)
    if image_id(host, ref) is not None:
        raise BenchError("docker rmi %s left the image in place" % ref)
    mine = set(chain_ids(diff_ids))
    left = mine & engine_chains(host)
    if left:
        raise BenchError("another image still holds layers of %s (%d); the load would not recreate them"
                         % (ref, len(left)))
    if handle is not None:  # our own dockerd: look at its layer store too
        layerdb = handle.data_root / "image" / "vfs" / "layerdb" / "sha256"
        still = [c for c in mine if (layerdb / c[7:]).exists()]
        if still:
            raise BenchError("layers still in %s after rmi: %s" % (layerdb, still))


# --- measuring --------------------------------------------------------------------------

class Result:
    """One measured stage."""

    def __init__(self, stage, seconds, nbytes=None, rss_kib=None, cpu=None, engine_cpu=None,
                 lines=(), note="", fetched=None):
        self.stage, self.seconds, self.nbytes = stage, seconds, nbytes
        self.rss_kib, self.cpu, self.engine_cpu = rss_kib, cpu, engine_cpu
        self.lines, self.note = list(lines), note
        self.fetched = fetched  # bytes fetched from the store (fleet pulls)

    @property
    def mbps(self):
        return self.nbytes / self.seconds / MB if self.nbytes and self.seconds > 0 else None


class Run:
    """What timed_process() saw: wall, peak RSS (KiB), CPU s, timestamped lines, stream times."""

    def __init__(self):
        self.wall = self.rss_kib = self.cpu = None
        self.lines = []
        self.first_byte = None   # s after start when the first stdout byte arrived (with sink)
        self.on_first_byte = None  # called (no arguments) when it does
        self.input_done = None   # s after start when all of stdin_path had been written


def _pump_out(src, sink, run, start):
    """Copy a child's stdout to SINK (a file, or None to discard), noting the first byte."""
    while True:
        data = src.read1(MiB) if hasattr(src, "read1") else src.read(MiB)
        if not data:
            break
        if run.first_byte is None:
            run.first_byte = time.perf_counter() - start
            if run.on_first_byte is not None:
                run.on_first_byte()
        if sink is not None:
            sink.write(data)


def _pump_in(path, dst, run, start):
    """Write the file PATH into a child's stdin, noting when the last byte went."""
    try:
        with open(str(path), "rb") as f:
            while True:
                data = f.read(MiB)
                if not data:
                    break
                dst.write(data)
        run.input_done = time.perf_counter() - start
    except (BrokenPipeError, ValueError):
        pass
    finally:
        try:
            dst.close()
        except OSError:
            pass


def _read_lines(src, run, start):
    for raw in src:
        run.lines.append((time.perf_counter() - start, raw.decode("utf-8", "replace").rstrip("\n")))


def timed_process(cmd, env, sink=False, stdin_path=None, timeout=900, on_first_byte=None):
    """Run CMD and measure it; raise BenchError if it fails.

    sink: False = stdout goes with stderr into timestamped lines; None = read and discard
    stdout; a binary file = copy stdout there (both note when the first byte came, and then
    call on_first_byte()).
    stdin_path: a file streamed into the child's stdin.
    CPU comes from wait4() on that one process; peak RSS is the most VmHWM (the high-water
    mark of the exec'd program's own memory) seen while polling it every 2 ms, or wait4's
    ru_maxrss if the process ended before the first look (ru_maxrss is no lower than this
    script's own peak: a child started with vfork inherits it at exec).
    """
    run, threads = Run(), []
    run.on_first_byte = on_first_byte
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env,
                            stdin=subprocess.PIPE if stdin_path else subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if sink is False else subprocess.PIPE)
    if sink is False:
        threads.append(threading.Thread(target=_read_lines, args=(proc.stdout, run, start)))
    else:
        threads.append(threading.Thread(target=_pump_out, args=(proc.stdout, sink, run, start)))
        threads.append(threading.Thread(target=_read_lines, args=(proc.stderr, run, start)))
    if stdin_path:
        threads.append(threading.Thread(target=_pump_in, args=(stdin_path, proc.stdin, run, start)))
    for t in threads:
        t.daemon = True
        t.start()
    reaped = False
    try:
        deadline = time.monotonic() + timeout
        hwm = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            seen = vm_hwm_kib(proc.pid)  # Popen returned after the exec, so this is the new program
            if seen is not None:
                hwm = seen if hwm is None else max(hwm, seen)
            if time.monotonic() > deadline:
                raise BenchError("%s took more than %d s" % (" ".join(str(c) for c in cmd[:4]), timeout))
            time.sleep(0.002)
        reaped = True
        run.wall = time.perf_counter() - start
        proc.returncode = exit_code(status)
        run.rss_kib = hwm if hwm is not None else usage.ru_maxrss
        run.cpu = usage.ru_utime + usage.ru_stime
        for t in threads:
            t.join(30)
    finally:
        if not reaped:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    if proc.returncode != 0:
        text = "\n".join(l for _, l in run.lines[-30:])
        raise BenchError("%s exited %d:\n%s" % (" ".join(str(c) for c in cmd), proc.returncode, text))
    return run


def process_cpu(pid):
    """User + system CPU seconds a live process has used so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def vm_hwm_kib(pid):
    """VmHWM (peak resident set of the current program, KiB) of a live process, or None."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def exit_code(status):
    """A wait() status as Popen.returncode would give it (negative for a signal)."""
    if hasattr(os, "waitstatus_to_exitcode"):
        return os.waitstatus_to_exitcode(status)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class EngineCpu:
    """CPU seconds used by our own dockerd and its containerd (None for an outside engine)."""

    def __init__(self, handle):
        self.pids = [p for p in (handle.pid, handle.containerd_pid) if p] if handle else []
        self.tick = os.sysconf("SC_CLK_TCK")

    def now(self):
        if not self.pids:
            return None
        total = 0
        for pid in self.pids:
            try:
                with open("/proc/%d/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
        return total / self.tick

    def since(self, before):
        after = self.now()
        return None if before is None or after is None else after - before


class PidsCpu(EngineCpu):
    """CPU seconds used by the given processes (the radosgw, OSD and monitor daemons)."""

    def __init__(self, pids):
        self.pids, self.tick = list(pids), os.sysconf("SC_CLK_TCK")


def sha256_cpu(path):
    """CPU seconds of one sha256 pass over a file (already in the page cache)."""
    digest, spent = hashlib.sha256(), 0.0
    with open(str(path), "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            start = time.thread_time()
            digest.update(block)
            spent += time.thread_time() - start
    return spent


def gzip_single(path):
    """gzip -1 of a file as one stream on one core; return (wall s, CPU s, compressed bytes)."""
    start, cpu0 = time.perf_counter(), time.process_time()
    comp, size = zlib.compressobj(1, zlib.DEFLATED, 31), 0
    with open(path, "rb") as f:
        while True:
            data = f.read(GZ_CHUNK)
            if not data:
                break
            size += len(comp.compress(data))
    size += len(comp.flush())
    return time.perf_counter() - start, time.process_time() - cpu0, size


def gzip_member(data):
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def _read_ranges(f, ranges):
    """Yield GZ_CHUNK pieces of the (offset, size) RANGES of an open file."""
    for offset, size in ranges:
        f.seek(offset)
        while size > 0:
            data = f.read(min(GZ_CHUNK, size))
            if not data:
                break
            size -= len(data)
            yield data


def gzip_parallel(path, workers, ranges=None):
    """gzip -1 of a file (or of its byte RANGES) in independent 2 MiB members on WORKERS threads."""
    start, cpu0, size = time.perf_counter(), time.process_time(), 0
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, open(path, "rb") as f:
        if ranges is None:
            ranges = [(0, os.fstat(f.fileno()).st_size)]
        for data in _read_ranges(f, ranges):
            pending.append(pool.submit(gzip_member, data))
            if len(pending) >= 2 * workers:
                size += len(pending.popleft().result())
        while pending:
            size += len(pending.popleft().result())
    return time.perf_counter() - start, time.process_time() - cpu0, size


def compressible_layer_ranges(path):
    """(offset, size) of the layer members dogestry would gzip: 2 MiB sample shrinks below 90%."""
    ranges = []
    with tarfile.open(str(path), "r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        manifest = json.loads(tar.extractfile(members["manifest.json"]).read())
        for name in manifest[0]["Layers"]:
            member = members[name]
            while member.issym() or member.islnk():
                member = members[os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))]
            f = tar.extractfile(member)
            sample = f.read(GZ_CHUNK)
            if len(sample) < 4096 or len(gzip_member(sample)) < 0.9 * len(sample):
                ranges.append((member.offset_data, member.size))
    return ranges


def best_of(repeat, measure):
    """Call MEASURE() REPEAT times; the Result with the least wall time, noting all of them."""
    return _best([measure() for _ in range(repeat)])


def best_of_interleaved(repeat, *measures):
    """Each of MEASURES REPEAT times, in turns (the order reversed every other round): the
    engine here runs tenths of a second faster or slower from one minute to the next, so a
    floor measured minutes before what is judged against it can skew the ratio either way.
    The best Result of each, as best_of."""
    runs = [[] for _ in measures]
    for number in range(repeat):
        order = list(range(len(measures)))
        for index in (order[::-1] if number % 2 else order):
            runs[index].append(measures[index]())
    return [_best(results) for results in runs]


def _best(results):
    best = min(results, key=lambda r: r.seconds)
    if len(results) > 1:
        times = "best of %d: %s s" % (len(results), ", ".join("%.2f" % r.seconds for r in results))
        best.note = times + ("; " + best.note if best.note else "")
    return best


def build_zipapp(workdir):
    """dogestry.pyz built by zipapp.sh from this checkout into the work dir: what users run (it
    carries the compiled module; running dogestry.py under PYTHONDONTWRITEBYTECODE=1 would
    compile 17k lines at every start, which costs time and about 14 MiB of peak RSS)."""
    pyz = workdir / "dogestry.pyz"
    subprocess.run(["sh", str(DOGESTRY.parent / "zipapp.sh"), str(pyz)], check=True, stdout=subprocess.DEVNULL)
    return pyz


def dogestry_cmd(workdir, *args):
    """The command line running dogestry.pyz ARGS with its temp files in the work dir."""
    return [sys.executable, str(workdir / "dogestry.pyz"), "--tempdir", str(workdir / "tmp")] + [str(a) for a in args]


def dir_bytes(path):
    """Bytes in all files under PATH."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- archives and copies: checking what import, export and copy produced ------------------

STORE_DIRS = ("blobs/", "images/", "layers/", "repositories/")  # what a store holds (not spools, not records)


def dir_listing(root):
    """{key: size} of a directory store's files under STORE_DIRS."""
    root = Path(root)
    listing = {}
    for p in root.rglob("*"):
        key = p.relative_to(root).as_posix()
        if p.is_file() and key.startswith(STORE_DIRS):
            listing[key] = p.stat().st_size
    return listing


def check_stored(where, listing, read, img, tag, diff_ids):
    """Check that a store (LISTING {key: size}, READ(key) -> bytes) holds TAG -> IMG: the tag, the
    config (its digest is the image ID), the manifest naming the image's layers in order, and each
    layer's blob at the size the manifest gives; raise BenchError if not.  The bytes of the blobs."""
    name, _, label = tag.rpartition(":")
    tag_key = "repositories/%s/%s" % (name, label)
    if tag_key not in listing:
        raise BenchError("%s: no tag %s (keys: %d)" % (where, tag, len(listing)))
    held = read(tag_key).decode("ascii", "replace").strip()
    if held.replace("sha256:", "") != img[7:]:
        raise BenchError("%s: tag %s names %r, not %s" % (where, tag, held[:80], img))
    config = read("images/%s/config.json" % img[7:])
    if "sha256:" + hashlib.sha256(config).hexdigest() != img:
        raise BenchError("%s: the config of %s does not match the image ID" % (where, img[7:19]))
    manifest = json.loads(read("images/%s/manifest.json" % img[7:]).decode("utf-8"))
    layers = manifest.get("layers") or []
    if [l.get("diffID") for l in layers] != list(diff_ids):
        raise BenchError("%s: the manifest of %s names layers %s, not %s"
                         % (where, img[7:19], [l.get("diffID") for l in layers], diff_ids))
    for layer in layers:
        key = "blobs/sha256/" + layer["digest"][7:]
        if listing.get(key) != int(layer["size"]):
            raise BenchError("%s: blob %s is %s, the manifest says %d B"
                             % (where, key, "absent" if key not in listing else "%d B" % listing[key], layer["size"]))
    return sum(int(l["size"]) for l in layers)


def compare_listings(listing, reference, what):
    """A note saying whether two stores hold the same keys at the same sizes (STORE_DIRS only)."""
    if listing == reference:
        return "same %d keys and sizes as %s" % (len(listing), what)
    missing = sorted(set(reference) - set(listing))
    extra = sorted(set(listing) - set(reference))
    resized = sorted(k for k in set(listing) & set(reference) if listing[k] != reference[k])
    return "keys differ from %s: %d missing%s, %d extra%s, %d of other sizes%s" % (
        what, len(missing), " (%s)" % ", ".join(missing[:3]) if missing else "", len(extra),
        " (%s)" % ", ".join(extra[:3]) if extra else "", len(resized),
        " (%s)" % ", ".join(resized[:3]) if resized else "")


def output_has(lines, expected):
    """Raise BenchError unless dogestry printed the line EXPECTED."""
    if not any(line == expected for _, line in lines):
        raise BenchError("dogestry did not print %r; it printed:\n%s" % (
            expected, "\n".join(line for _, line in lines[-20:])))


class MemberDigest:
    """sha256 of a tar member's bytes and, when they are gzip (one or more members back to back),
    of what they unpack to."""

    def __init__(self):
        self.raw, self.unpacked, self.size = hashlib.sha256(), None, 0
        self.inflater, self.started = None, False

    def update(self, data):
        if self.size == 0 and data[:2] == b"\x1f\x8b":
            self.unpacked, self.inflater = hashlib.sha256(), zlib.decompressobj(31)
        self.raw.update(data)
        self.size += len(data)
        while self.inflater is not None and data:
            self.started = True
            self.unpacked.update(self.inflater.decompress(data))
            if not self.inflater.eof:
                break
            data = self.inflater.unused_data
            self.inflater, self.started = zlib.decompressobj(31), False

    def digests(self):
        """(raw digest, unpacked digest or None); the unpacked one is None for cut-short gzip too."""
        complete = self.unpacked is not None and not self.started
        return "sha256:" + self.raw.hexdigest(), "sha256:" + self.unpacked.hexdigest() if complete else None


def verify_archive(path, fmt, img, diff_ids, tag):
    """Read an exported archive (FMT docker or oci) to its end and check what a loader checks:
    IMG's config (its digest), TAG, every layer in order unpacking to its diffID, every OCI blob
    matching its name; raise BenchError if not.  A one-line summary."""
    digests, small, links = {}, {}, {}
    with tarfile.open(str(path), "r|") as tar:
        for member in tar:
            if member.issym():
                links[member.name] = os.path.normpath(os.path.join(os.path.dirname(member.name), member.linkname))
                continue
            if member.islnk():
                links[member.name] = member.linkname
                continue
            if not member.isfile():
                continue
            f, digest, kept = tar.extractfile(member), MemberDigest(), []
            for block in iter(lambda: f.read(MiB), b""):
                digest.update(block)
                if member.size <= MiB:
                    kept.append(block)
            digests[member.name] = digest.digests()
            if member.size <= MiB:
                small[member.name] = b"".join(kept)

    def resolve(name):
        for _ in range(10):
            if name not in links:
                return name
            name = links[name]
        return name

    def layer_digest(name):
        raw, unpacked = digests.get(resolve(name), (None, None))
        return unpacked or raw

    def document(name):
        if resolve(name) not in small:
            raise BenchError("%s: no %s" % (path, name))
        return small[resolve(name)]

    config_hex = img[7:]
    if fmt == "docker":
        manifest = json.loads(document("manifest.json").decode("utf-8"))
        if len(manifest) != 1 or manifest[0].get("RepoTags") != [tag]:
            raise BenchError("%s: manifest.json %s, not one image tagged %s" % (path, manifest, tag))
        if digests.get(resolve(manifest[0]["Config"]), (None,))[0] != img:
            raise BenchError("%s: the config %s is not %s" % (path, manifest[0]["Config"], img))
        layer_names = manifest[0]["Layers"]
    else:
        bad = [n for n, (raw, _) in digests.items() if n.startswith("blobs/sha256/") and raw[7:] != n[13:]]
        if bad:
            raise BenchError("%s: blobs that do not match their names: %s" % (path, bad[:3]))
        index = json.loads(document("index.json").decode("utf-8"))
        name, _, label = tag.rpartition(":")
        full = "docker.io/%s:%s" % (name if "/" in name else "library/" + name, label)
        chosen = [d for d in index.get("manifests", []) if (d.get("annotations") or {}).get(
            "io.containerd.image.name") == full and d["annotations"].get("org.opencontainers.image.ref.name") in (
            tag, label)]  # ref.name: NAME:TAG (the README) or TAG (the spec's first draft)
        if len(chosen) != 1 or "oci-layout" not in small:
            raise BenchError("%s: index.json %s has no one manifest annotated io.containerd.image.name %s and"
                             " org.opencontainers.image.ref.name %s or %s (or no oci-layout)"
                             % (path, index, full, tag, label))
        manifest = json.loads(document("blobs/sha256/" + chosen[0]["digest"][7:]).decode("utf-8"))
        if manifest["config"]["digest"] != img or "blobs/sha256/" + config_hex not in digests:
            raise BenchError("%s: the manifest's config is %s, not %s" % (path, manifest["config"]["digest"], img))
        layer_names = ["blobs/sha256/" + l["digest"][7:] for l in manifest["layers"]]
    got = [layer_digest(n) for n in layer_names]
    if got != list(diff_ids):
        raise BenchError("%s: the layers unpack to %s, not the image's diffIDs %s" % (path, got, diff_ids))
    return "%s archive read to its end: %d members, config = the image ID, tag %s, %d layers unpack to the" \
           " config's diffIDs" % (fmt, len(digests) + len(links), tag, len(layer_names))


# --- S3 --------------------------------------------------------------------------------

def radosgw_installed():
    """True if the Ceph daemons tests/radosgw.py needs are on PATH."""
    return all(shutil.which(b) for b in ("radosgw", "ceph-mon", "ceph-osd", "ceph", "radosgw-admin"))


def load_dogestry():
    """dogestry.py as a module (for its S3 client)."""
    spec = importlib.util.spec_from_file_location("dogestry", str(DOGESTRY))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def s3_client(dogestry, gw, bucket):
    """An in-process dogestry.S3Client for BUCKET on the radosgw GW (keys given, nothing else AWS-ish)."""
    env = {"AWS_ACCESS_KEY_ID": gw.access_key, "AWS_SECRET_ACCESS_KEY": gw.secret_key,
           "AWS_EC2_METADATA_DISABLED": "true"}
    config = dogestry.AwsConfig(env, "/nonexistent")
    location = dogestry.S3Location(bucket, "", "us-east-1", gw.endpoint)
    return dogestry.S3Client(location, dogestry.CredentialChain(config), config)


def make_bucket(client):
    """Create the client's bucket (as tests/conftest.py does: no location body for radosgw)."""
    client.request("PUT").read()


def part_ranges(size, piece):
    """(number from 1, offset, length) of PIECE-sized parts of SIZE bytes."""
    return [(n + 1, off, min(piece, size - off)) for n, off in enumerate(range(0, size, piece))]


def file_part_hashes(path, parts):
    """Hex sha256 of each (number, offset, length) part of a file."""
    hashes = []
    with open(str(path), "rb") as f:
        for _, offset, length in parts:
            f.seek(offset)
            hashes.append(hashlib.sha256(f.read(length)).hexdigest())
    return hashes


def s3_put_single(dogestry, client, key, path, size, sha256_hex):
    """One signed PUT of the whole file, streamed from disk."""
    client.put(key, lambda: dogestry.FileRange(str(path), 0, size), size, sha256_hex)


def s3_put_multipart(dogestry, client, key, path, size, parts, hashes, streams):
    """A multipart upload of PARTS (hashes known) on STREAMS connections; aborted on failure."""
    root = dogestry._parse_xml(client.call("POST", key, query=[("uploads", "")],
                                           headers={"Content-Type": "application/octet-stream"})[1])
    upload_id = dogestry._xml_text(root, ".//UploadId") if root is not None else None
    if not upload_id:
        raise BenchError("CreateMultipartUpload %s: no upload id" % key)

    def put_part(part):
        (number, offset, length), sha = part
        resp, _ = client.call("PUT", key, query=[("partNumber", str(number)), ("uploadId", upload_id)],
                              headers={"Content-Length": str(length)},
                              body=lambda: dogestry.FileRange(str(path), offset, length), payload_hash=sha)
        return resp.getheader("ETag")

    try:
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            etags = list(pool.map(put_part, zip(parts, hashes)))
        body = ("<CompleteMultipartUpload>%s</CompleteMultipartUpload>" % "".join(
            "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag></Part>" % (n, xml_escape(etag))
            for (n, _, _), etag in zip(parts, etags))).encode()
        _, answer = client.call("POST", key, query=[("uploadId", upload_id)], body=lambda: body,
                                headers={"Content-Length": str(len(body)), "Content-Type": "application/xml"},
                                payload_hash=hashlib.sha256(body).hexdigest())
        root = dogestry._parse_xml(answer)
        if root is not None and root.tag == "Error":
            raise BenchError("CompleteMultipartUpload %s: %s" % (key, dogestry._xml_text(root, ".//Code")))
    except BaseException:
        try:
            client.call("DELETE", key, query=[("uploadId", upload_id)], ok=(204, 200, 404))
        except Exception:  # noqa: BLE001 - the first failure is the one to report
            pass
        raise


def _drain(resp, buf):
    """Read a response to its end into the reusable buffer BUF; the byte count."""
    view, total = memoryview(buf), 0
    while True:
        n = resp.readinto(view)
        if not n:
            return total
        total += n


_GET_BUFFERS = threading.local()


def s3_get_single(client, key, size):
    """One GET of the whole object, read and discarded."""
    got = _drain(client.get(key), bytearray(MiB))
    if got != size:
        raise BenchError("GET %s: %d bytes, expected %d" % (key, got, size))


def s3_get_ranges(client, key, size, piece, streams):
    """The whole object as PIECE-sized ranged GETs on STREAMS connections, read and discarded."""
    def fetch(part):
        _, offset, length = part
        buf = getattr(_GET_BUFFERS, "buf", None)
        if buf is None:
            buf = _GET_BUFFERS.buf = bytearray(MiB)
        got = _drain(client.get(key, offset, offset + length - 1), buf)
        if got != length:
            raise BenchError("GET %s range at %d: %d bytes, expected %d" % (key, offset, got, length))
        return got

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(fetch, part_ranges(size, piece)))
    if total != size:
        raise BenchError("ranged GETs of %s: %d bytes, expected %d" % (key, total, size))


def s3_keys(client, prefix):
    """{key: size} of every object under PREFIX."""
    return dict(client.list(prefix))


def touch_memory(nbytes):
    """Allocate, fill and free NBYTES once (the VM's first touch of fresh memory is slow).

    In a child process: a child started with vfork inherits this script's peak RSS as the
    start of its own ru_maxrss, so this script must stay small."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "block = b'\\x01' * %d" % nbytes], check=True)
    return time.perf_counter() - start


# --- fleet: extra dockerds, and what a pull fetched from the store ------------------------

def registry_answers(address, port):
    """Does a registry answer GET /v2/ there (200 or 401)?"""
    conn = http.client.HTTPConnection(address, port, timeout=2)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status in (200, 401)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def manifest_layers(address, port, ref):
    """The layers a registry's manifest of REF names (their descriptors)."""
    name, _, tag = ref.rpartition(":")
    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.request("GET", "/v2/%s/manifests/%s" % (name, tag), headers={"Accept": ", ".join((
            "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"))})
        return json.loads(conn.getresponse().read())["layers"]
    finally:
        conn.close()


def manifest_layer_sizes(address, port, ref):
    return [layer["size"] for layer in manifest_layers(address, port, ref)]


def served_layers(address, port, ref):
    """The layers a registry's manifest of REF names: their sizes and media types, for the report."""
    return ", ".join("%.1f MB %s" % (l["size"] / MB, l["mediaType"].rpartition(".")[2])
                     for l in manifest_layers(address, port, ref))


def wchar(pid):
    """Bytes process PID has written so far, to files and sockets (/proc/PID/io)."""
    with open("/proc/%d/io" % pid) as f:
        return int(re.search(r"^wchar: (\d+)", f.read(), re.M).group(1))


def ctr_pull(sock, ref):
    """ctr images pull of REF into a namespace of its own (so nothing is there yet), timed."""
    namespace = "bench%s" % os.urandom(4).hex()
    run = timed_process(["ctr", "-a", sock, "-n", namespace, "images", "pull", "--plain-http", "--snapshotter",
                         "native", ref], os.environ.copy())
    subprocess.run(["ctr", "-a", sock, "-n", namespace, "images", "rm", "--sync", ref], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return Result("", run.wall, None, None, None, None)


def port_open(address, port, timeout=0.5):
    """True if something accepts TCP connections at ADDRESS:PORT."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_fleet(workdir, state):
    """Start one dockerd per FLEET_ADDRESSES (own dirs, tcp://ADDR:2375); the list is state["fleet"].

    Called from the main thread: realdocker's die-with-parent option ties each dockerd to
    the thread that launched it."""
    busy = ["%s:%d" % (a, port) for a in FLEET_ADDRESSES for port in (FLEET_PORT, SERVER_PORT)
            if port_open(a, port)]
    if busy:
        raise BenchError("something already listens on %s (another benchmark?); --no-fleet skips the fleet"
                         % ", ".join(busy))
    fleet = state.setdefault("fleet", [])
    for address in FLEET_ADDRESSES:
        t = time.perf_counter()
        handle = start_dockerd(workdir / ("fleet-%s" % address.rsplit(".", 1)[1]),
                               "%s:%d" % (address, FLEET_PORT))
        fleet.append(handle)
        log("fleet dockerd %s up in %.1f s (pid %d)" % (handle.tcp, time.perf_counter() - t, handle.pid))
    return list(fleet)


def stop_fleet(state, keep=False):
    """Stop the fleet's dockerds (all signalled first, so they stop in parallel)."""
    fleet = state.pop("fleet", None)
    if fleet:
        log("stopping %d fleet dockerds" % len(fleet))
        for handle in fleet:
            handle.terminate()
        for handle in fleet:
            handle.stop(remove_data=not keep)


def stored_layers(manifest_bytes):
    """{diffID[7:19] (as dogestry's progress labels it): (blob hex, blob size)} from a stored manifest.json."""
    doc = json.loads(manifest_bytes.decode("utf-8"))
    return {layer["diffID"][7:19]: (layer["digest"][7:], int(layer["size"])) for layer in doc["layers"]}


_DOWNLOADED = re.compile(r"^([0-9a-f]{12}): downloaded\b")


def downloaded_blobs(lines, layers):
    """[(label, blob size)] of dogestry's 'LABEL: downloaded ...' progress lines (the fleet spool's downloads)."""
    found = []
    for _, line in lines:
        m = _DOWNLOADED.match(line)
        if m:
            if m.group(1) not in layers:
                raise BenchError("dogestry downloaded %s, which is not a layer of the image" % m.group(1))
            found.append((m.group(1), layers[m.group(1)][1]))
    return found


class FileOpens:
    """Counts opens of the files in some directories of a tree (inotify IN_OPEN; Linux)."""

    IN_OPEN, IN_Q_OVERFLOW, IN_NONBLOCK, IN_CLOEXEC = 0x20, 0x4000, 0o4000, 0o2000000

    def __init__(self, root, subdirs):
        """Watch ROOT/SUBDIR for each of SUBDIRS (its files, not below); names are relative to ROOT."""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1: %s" % os.strerror(ctypes.get_errno()))
        self.dirs = {}  # watch descriptor -> subdir
        for subdir in subdirs:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(str(Path(root) / subdir)), self.IN_OPEN)
            if wd < 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, "inotify_add_watch %s: %s" % (Path(root) / subdir, os.strerror(err)))
            self.dirs[wd] = subdir

    def take(self):
        """{SUBDIR/file name: opens} since the last take()."""
        counts = collections.Counter()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return counts
            offset = 0
            while offset + 16 <= len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].split(b"\0", 1)[0].decode("utf-8", "replace")
                offset += 16 + length
                if mask & self.IN_Q_OVERFLOW:
                    raise BenchError("inotify queue overflowed: file opens were lost")
                if name and wd in self.dirs:
                    counts["%s/%s" % (self.dirs[wd], name)] += 1

    def close(self):
        os.close(self.fd)


def admin_socket(path, command, timeout=10.0):
    """A Ceph daemon's answer (JSON) to COMMAND (a dict) on its admin socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(command).encode() + b"\0")
        head = b""
        while len(head) < 4:
            data = sock.recv(4 - len(head))
            if not data:
                raise BenchError("admin socket %s: no answer to %s" % (path, command))
            head += data
        size, body = struct.unpack(">I", head)[0], b""
        while len(body) < size:
            data = sock.recv(min(1 << 16, size - len(body)))
            if not data:
                raise BenchError("admin socket %s: answer cut short" % path)
            body += data
    return json.loads(body.decode("utf-8"))


# radosgw's beast frontend logs every request at debug_rgw 1 (the default):
#   ... beast: 0x..: 127.0.0.1 - tester [date] "GET /bucket/key HTTP/1.1" 206 8388608 - - bytes=0-8388607 ...
# the number after the status is the body bytes it sent (plus those it received, 0 for a GET)
_BEAST_LINE = re.compile(r' beast: \S+ \S+ - \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+) ')


class RgwMeter:
    """What radosgw served between mark() and served(): from its access log, checked by its counters."""

    def __init__(self, gw):
        self.log_path = gw.log_path("client.rgw.a")
        self.asok = os.path.join(gw.run_dir, "ceph-client.rgw.a.asok")

    def counters(self):
        return admin_socket(self.asok, {"prefix": "perf dump"})["rgw"]

    def mark(self):
        return os.path.getsize(self.log_path), self.counters()

    def served(self, mark, bucket, prefix):
        """A RgwServed for the requests since MARK (waits until the log holds all of them)."""
        after = self.counters()
        return RgwServed(self.logged(mark, after), after["req"] - mark[1]["req"], after["get_b"] - mark[1]["get_b"],
                         bucket, prefix)

    def traffic(self, mark):
        """A RgwTraffic for the requests since MARK."""
        after = self.counters()
        return RgwTraffic(self.logged(mark, after), mark[1], after)

    def logged(self, mark, after=None):
        """(method, target, status, bytes) of every request since MARK (waits until the log holds all
        the counter counted)."""
        offset, before = mark
        after = after or self.counters()
        expected = after["req"] - before["req"]
        deadline = time.monotonic() + 15
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode("utf-8", "replace")
            requests = [m.groups() for m in map(_BEAST_LINE.search, text.splitlines()) if m]
            if len(requests) >= expected:
                return requests
            if time.monotonic() > deadline:
                raise BenchError("radosgw's log shows %d requests, its counter %d: the log is incomplete"
                                 % (len(requests), expected))
            time.sleep(0.1)


class RgwServed:
    """Requests radosgw served: GET bytes in all, per blob, the rest; and its own get_b counter."""

    def __init__(self, requests, counted, get_b, bucket, prefix):
        self.requests, self.counted, self.get_b = len(requests), counted, get_b
        self.blobs = collections.Counter()        # blob hex -> bytes sent
        self.blob_gets = self.other_gets = self.other_bytes = self.heads = self.failed = 0
        self.object_gets = self.object_bytes = 0  # GETs of objects (what get_b counts)
        blob_path = "/%s/%sblobs/sha256/" % (bucket, prefix)
        for method, target, status, nbytes in requests:
            path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
            status, nbytes = int(status), int(nbytes)
            if method == "HEAD":
                self.heads += 1
            elif method != "GET" or not 200 <= status < 300:
                self.failed += 1
            elif path.startswith(blob_path):
                self.blobs[path[len(blob_path):]] += nbytes
                self.blob_gets += 1
            else:
                self.other_gets += 1
                self.other_bytes += nbytes
            if method == "GET" and 200 <= status < 300 and path.strip("/").count("/"):
                self.object_gets += 1
                self.object_bytes += nbytes

    @property
    def fetched(self):
        return sum(self.blobs.values()) + self.other_bytes

    @property
    def get_b_agrees(self):
        """radosgw's get_b adds end - start of each GET's inclusive byte range: one byte short per GET."""
        return self.get_b + self.object_gets == self.object_bytes

    def describe(self, layers):
        sizes = {hexd: size for hexd, size in layers.values()}
        once = sum(1 for h, n in self.blobs.items() if sizes.get(h) == n)
        return ("radosgw's log: %d requests; %d blob(s) %s B in %d GETs (%d of %d blobs exactly once)"
                ",\n  %d other GETs %s B, %d HEADs%s; radosgw's get_b counter %s"
                % (self.requests, len(self.blobs), "{:,}".format(sum(self.blobs.values())), self.blob_gets,
                   once, len(sizes), self.other_gets, "{:,}".format(self.other_bytes), self.heads,
                   ", %d failed/other requests" % self.failed if self.failed else "",
                   "agrees (+1 B per GET)" if self.get_b_agrees else "says %s B (DIFFERS)"
                   % "{:,}".format(self.get_b)))


class RgwTraffic:
    """The bytes that went between radosgw and its clients: per request, its access log counts the
    body bytes it sent plus those it received (a GET: the object bytes it sent; a PUT of an object
    or a part: its body; a CopyObject: only its small XML answer); its get_b and put_b counters
    count object bytes it served and stored."""

    def __init__(self, requests, before, after):
        self.requests = len(requests)
        self.methods = collections.Counter(method for method, _, _, _ in requests)
        self.get_bytes = sum(int(n) for method, _, _, n in requests if method == "GET")
        self.put_bytes = sum(int(n) for method, _, _, n in requests if method in ("PUT", "POST"))
        self.other_bytes = sum(int(n) for method, _, _, n in requests if method not in ("GET", "PUT", "POST"))
        self.blob_bytes = sum(int(n) for _, target, _, n in requests if "/blobs/sha256/" in target)
        self.failed = sum(1 for _, _, status, _ in requests if not 200 <= int(status) < 300 and int(status) != 404)
        self.get_b = after.get("get_b", 0) - before.get("get_b", 0)
        self.put_b = after.get("put_b", 0) - before.get("put_b", 0)

    @property
    def through(self):
        """Every body byte radosgw's log counts: what passed through the machine, at most."""
        return self.get_bytes + self.put_bytes + self.other_bytes

    def describe(self):
        return ("radosgw's log: %d requests (%s)%s; GET answers %s B, PUT/POST bodies and answers %s B"
                " (blob keys: %s B); its counters: get_b %s B, put_b %s B"
                % (self.requests, ", ".join("%s %d" % kv for kv in sorted(self.methods.items())),
                   ", %d failed" % self.failed if self.failed else "", "{:,}".format(self.get_bytes),
                   "{:,}".format(self.put_bytes), "{:,}".format(self.blob_bytes), "{:,}".format(self.get_b),
                   "{:,}".format(self.put_b)))


# --- machine facts ----------------------------------------------------------------------

def machine_facts(host, workdir):
    """Lines describing the machine and the engine."""
    facts = []
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    facts.append("nproc: %s (os.cpu_count %s)" % (affinity, os.cpu_count()))
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        facts.append("cpu: %s" % model)
    except (OSError, StopIteration):
        pass
    try:
        mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
        facts.append("memory: %.1f GiB" % (mem / 1024 / 1024))
    except (OSError, StopIteration):
        pass
    try:
        facts.append("load average at start: %s (other work on the machine skews timings)" % loadavg())
    except OSError:
        pass
    facts.append("python: %s (%s); dogestry runs as dogestry.pyz, built from this checkout by zipapp.sh"
                 % (platform.python_version(), sys.executable))
    facts.append("kernel: %s" % platform.release())
    ver = docker_cli(host, "version", "--format",
                     "client {{.Client.Version}}, server {{.Server.Version}} (API {{.Server.APIVersion}})",
                     check=False)
    facts.append("docker: %s" % (ver.stdout.strip() or ver.stderr.strip()))
    drv = docker_cli(host, "info", "--format", "{{.Driver}}", check=False)
    facts.append("storage driver: %s; DOCKER_HOST %s" % (drv.stdout.strip(), host))
    st = os.statvfs(str(workdir))
    facts.append("work dir: %s (%.0f GiB free)" % (workdir, st.f_bavail * st.f_frsize / 1024 ** 3))
    return facts


# --- start-up -----------------------------------------------------------------------------

def small_store(workdir):
    """A directory store holding one tiny image, small/app:1, made by dogestry import (no engine)."""
    archive, store = small_save_archive(workdir / "small.tar"), workdir / "store-small"
    subprocess.run(dogestry_cmd(workdir, "import", "-q", store, archive), check=True, stdout=subprocess.DEVNULL)
    return store


def measure_startup(workdir, runs):
    """python3 -c pass, and dogestry.pyz (as users run it) version, help, a usage error, list of a
    small directory store: RUNS runs of each in turns (the order reversed every other round), so
    the machine's load weighs on all alike.  Rows (a heading and Results: medians) and targets
    (each command's median over python3 -c pass's)."""
    pyz = [sys.executable, str(workdir / "dogestry.pyz")]
    commands = [("python3 -c pass", [sys.executable, "-c", "pass"], 0, None),
                ("dogestry.pyz version", pyz + ["version"], 0, TARGET_STARTUP_MS),
                ("dogestry.pyz help", pyz + ["help"], 0, TARGET_STARTUP_MS),
                ("dogestry.pyz push (a usage error)", pyz + ["push"], 2, TARGET_STARTUP_MS),
                ("dogestry.pyz list (a small directory store)", pyz + ["list", str(small_store(workdir))], 0,
                 TARGET_STARTUP_LIST_MS)]
    times = [[] for _ in commands]
    for number in range(runs):
        order = list(range(len(commands)))
        for index in order[::-1] if number % 2 else order:
            _, cmd, status, _ = commands[index]
            start = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[index].append(time.perf_counter() - start)
            if proc.returncode != status:
                raise BenchError("%s exited with %d, not %d" % (" ".join(cmd), proc.returncode, status))
    medians = [statistics.median(t) for t in times]
    rows, checks = ["start-up (medians of %d runs in turns; vs python3 -c pass)" % runs], []
    for (stage, _, _, target), median, spread in zip(commands, medians, times):
        over = (median - medians[0]) * 1000
        rows.append(Result("  " + stage, median, note="" if target is None else "+%.1f ms over python3 -c pass"
                           " (fastest run %.3f s)" % (over, min(spread))))
        if target is not None:
            checks.append((over <= target, "%s +%.1f ms over python3 -c pass (%.1f ms) <= +%d ms"
                           % (stage, over, medians[0] * 1000, target)))
    return rows, checks


# --- sub-layer dedup: chunked layers against whole layers ----------------------------------

CHUNK_REPO = "dogestry-bench/chunks-%d" % os.getpid()  # tags v1, v2 (A), v3 (B), c1, c2 (C)
CHUNK_SIZE_MIB = 1024        # the A/B layer (--chunk-size-mib); C's file is 500/1024 of it
CHUNK_FILE_MEAN = 350 << 10  # the A/B layer's files: sizes drawn around this (exponential) ...
CHUNK_FILE_MIN, CHUNK_FILE_MAX = 4 << 10, 4 << 20  # ... and kept within these
CHUNK_FILE_KINDS = (("txt", 45), ("so", 40), ("gz", 15))  # text, binary-ish code, incompressible: weights
EDIT_FILE_SIZE = 512 << 10   # A: the edited file (a text file in the middle of the tree) ...
EDIT_BYTES = 4 << 10         # ... gets this many bytes in its middle rewritten in place
INSERT_BYTES, INSERT_AT = 1 << 10, 0.4  # C: bytes inserted into the big file, where (share of its size)
TOUCH_MTIME = FIXED_MTIME + 30 * 86400  # B: every file's and directory's new mtime
TARGET_EDIT_SLACK = 2 * MiB  # A: re-push uploads <= this + the edited file
TARGET_TOUCH_SHARE = 0.02    # B: re-push uploads <= this share of the layer (its uncompressed tar)
TARGET_REPUSH_SPEEDUP = 3.0  # A and B: re-push at least this much faster than the layer-level one
CHUNK_PREFIXES = ("chunks", "blobs", "layers", "images", "repositories")  # objects written, by kind


def write_chunk_tree(root, total):
    """About TOTAL bytes in a few thousand files under ROOT/dNN/ (text, binary-ish code and
    incompressible data; sizes drawn around CHUNK_FILE_MEAN), fixed modes and mtimes; the file
    of EDIT_FILE_SIZE text in the middle of the tree that scenario A edits, and the file count."""
    rng = random.Random(23)
    makers = {"txt": text_bytes, "so": binaryish_bytes, "gz": random_bytes}
    kinds, weights = zip(*CHUNK_FILE_KINDS)
    written, index, edit = 0, 0, None
    while written < total:
        kind = rng.choices(kinds, weights)[0]
        size = min(max(int(rng.expovariate(1.0 / CHUNK_FILE_MEAN)), CHUNK_FILE_MIN), CHUNK_FILE_MAX)
        if edit is None and written >= total // 2:
            kind, size = "txt", EDIT_FILE_SIZE
        size = min(size, total - written)
        path = root / ("d%02d" % (index % 32)) / ("f%05d.%s" % (index, kind))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(makers[kind](size, 23000 + index))
        os.chmod(str(path), 0o644)
        if kind == "txt" and size == EDIT_FILE_SIZE and edit is None:
            edit = path
        written += size
        index += 1
    set_mtimes(root, FIXED_MTIME)
    return edit, index


def set_mtimes(root, mtime):
    """Every file's and directory's mtime under ROOT (and ROOT's) to MTIME."""
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        os.utime(str(path), (mtime, mtime))


def edit_in_place(path):
    """Rewrite EDIT_BYTES of text in the middle of the file (its size stays; its mtime is now's, as an editor's)."""
    with open(str(path), "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(text_bytes(EDIT_BYTES, 424242))


def write_big_file(path, size):
    """SIZE incompressible bytes (C's file), GEN_CHUNK at a time."""
    path.parent.mkdir(parents=True)
    with open(str(path), "wb") as f:
        for offset in range(0, size, GEN_CHUNK):
            f.write(random_bytes(min(GEN_CHUNK, size - offset), 5000 + offset // GEN_CHUNK))
    os.chmod(str(path), 0o644)
    set_mtimes(path.parent, FIXED_MTIME)


def insert_into(path, offset, data):
    """Insert DATA into the file at OFFSET (written anew beside it, then renamed over it)."""
    tmp = path.with_name(path.name + ".new")
    with open(str(path), "rb") as src, open(str(tmp), "wb") as dst:
        left = offset
        while left:
            piece = src.read(min(GEN_CHUNK, left))
            dst.write(piece)
            left -= len(piece)
        dst.write(data)
        shutil.copyfileobj(src, dst, GEN_CHUNK)
    os.chmod(str(tmp), 0o644)
    os.replace(str(tmp), str(path))


def build_context(host, ctx, tag, copy_line):
    """docker build --no-cache of CTX (FROM scratch + COPY_LINE) as TAG; its image ID and diffIDs."""
    (ctx / "Dockerfile").write_text("FROM scratch\n%s\n" % copy_line)
    t = time.perf_counter()
    docker_cli(host, "build", "--no-cache", "-q", "-t", tag, str(ctx), timeout=1800)
    diff_ids = json.loads(docker_cli(host, "image", "inspect", "-f", "{{json .RootFS.Layers}}", tag).stdout)
    log("built %s (%s) in %.1f s" % (tag, image_id(host, tag)[7:19], time.perf_counter() - t))
    return image_id(host, tag), diff_ids


def store_files(root):
    """{key: (inode, size)} of every file in a directory store (a file a push wrote anew has a new inode)."""
    files, root = {}, str(root)
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                files[os.path.relpath(path, root).replace(os.sep, "/")] = (st.st_ino, st.st_size)
    return files


def written_objects(before, after):
    """{top directory: count} of the files (store objects) created or replaced between two store_files()."""
    counts = collections.Counter()
    for key, (inode, _) in after.items():
        if key not in before or before[key][0] != inode:
            counts[key.split("/", 1)[0]] += 1
    return counts


def snapshot_store(store, snap):
    """A copy of a directory store made of hard links (dogestry writes files anew and renames them into
    place, so the copy keeps what the store held)."""
    remove_tree(snap)
    subprocess.run(["cp", "-al", str(store), str(snap)], check=True)


def restore_store(store, snap):
    """The store as snapshot_store() saw it."""
    remove_tree(store)
    subprocess.run(["cp", "-al", str(snap), str(store)], check=True)


def chunk_record(store, img):
    """The layer record of a one-layer image in a directory store."""
    [record] = json.loads((store / "images" / img[7:] / "manifest.json").read_text())["layers"]
    return record


class ChunkStage:
    """Scenarios A-D of issue 23: an image rebuilt after one file's edit (A), after every mtime
    changed (B), after 1 KiB inserted into a big file (C), pushed with chunked layers and with
    DOGESTRY_CHUNKS=0 (whole layers: today's layer-level dedup) into directory stores that hold
    the image as first built; D: the re-pushes' times.  rows: Results for the main table; lines:
    its own table; checks: (ok, text)."""

    def __init__(self, args, state, workdir, host, handle, env):
        self.args, self.state, self.workdir = args, state, workdir
        self.host, self.handle, self.env = host, handle, env
        self.rows, self.lines, self.checks, self.facts = [], [], [], []
        self.stores = {True: workdir / "store-chunked", False: workdir / "store-layers"}
        self.images = {}  # label -> (image ID, diffIDs)
        self.raw = None    # bytes of the tree layer's tar

    def tag(self, label):
        return "%s:%s" % (CHUNK_REPO, label)

    def build(self, ctx, label, copy_line):
        self.state.setdefault("chunk_tags", []).append(self.tag(label))
        self.images[label] = build_context(self.host, ctx, self.tag(label), copy_line)

    def push(self, label, chunked, snap=None):
        """Push image LABEL into the chunked or whole-layer store (restored from SNAP first): a Result
        noting --json's bytes_sent, chunks_sent and chunks_skipped, the store's growth and the objects written."""
        store = self.stores[chunked]
        if snap is not None:
            restore_store(store, snap)
        before = store_files(store)
        out = self.workdir / "push.json"
        with open(str(out), "wb") as f:
            run = timed_process(dogestry_cmd(self.workdir, "push", "--json", store, self.tag(label)),
                                dict(self.env, DOGESTRY_CHUNKS="1" if chunked else "0"), sink=f)
        [doc] = json.loads(out.read_text())["images"]
        after = store_files(store)
        img, diff_ids = self.images[label]
        check_stored("the %s store" % ("chunked" if chunked else "layer-level"), dir_listing(store),
                     lambda key: (store / key).read_bytes(), img, self.tag(label), diff_ids)
        result = Result("", run.wall, None, run.rss_kib, run.cpu, lines=run.lines)
        result.sent, result.chunks = doc["bytes_sent"], (doc["chunks_sent"], doc["chunks_skipped"])
        result.growth = sum(n for _, n in after.values()) - sum(n for _, n in before.values())
        result.objects = written_objects(before, after)
        result.note = "uploaded %s B, store grew %s B; %d objects written (%s); chunks sent %d, found %d" % (
            "{:,}".format(result.sent), "{:,}".format(result.growth), sum(result.objects.values()),
            ", ".join("%s %d" % (k, result.objects[k]) for k in CHUNK_PREFIXES if result.objects[k]),
            result.chunks[0], result.chunks[1])
        return result

    def repush(self, label, stage):
        """Both stores' re-push of LABEL, from the same start each time (--repeat: best of N, in turns)."""
        snaps = {c: self.workdir / ("snap-%s" % ("chunked" if c else "layers")) for c in self.stores}
        for chunked, snap in snaps.items():
            snapshot_store(self.stores[chunked], snap)
        firsts = {c: True for c in snaps}

        def measure(chunked):
            first, firsts[chunked] = firsts[chunked], False
            return self.push(label, chunked, None if first else snaps[chunked])

        chunked, whole = best_of_interleaved(self.args.repeat, lambda: measure(True), lambda: measure(False))
        for snap in snaps.values():
            remove_tree(snap)
        return self.add(stage, chunked, whole)

    def add(self, stage, chunked, whole):
        self.rows.append(named_result("%s, chunked" % stage, chunked))
        self.rows.append(named_result("%s, layer-level" % stage, whole))
        return chunked, whole

    def save_floor(self, label):
        """docker save of LABEL > /dev/null: the engine's export, which every push waits for."""
        run = timed_process([find_docker(), "-H", self.host, "save", self.tag(label)], self.env, sink=None)
        self.rows.append(Result("  (docker save %s > /dev/null)" % label, run.wall,
                                note="the engine's export every push of it reads"))
        return run.wall

    def pull(self, label, chunked):
        """dogestry pull of LABEL after docker rmi; the image ID must come back."""
        img, diff_ids = self.images[label]
        remove_image(self.host, self.tag(label), diff_ids, self.handle)
        run = timed_process(dogestry_cmd(self.workdir, "pull", self.stores[chunked], self.tag(label)), self.env)
        if image_id(self.host, self.tag(label)) != img:
            raise BenchError("dogestry pull gave image %s, not %s" % (image_id(self.host, self.tag(label)), img))
        return Result("", run.wall, self.raw, run.rss_kib, run.cpu, lines=run.lines, note="image ID after pull: the same")

    def run(self):
        size = self.args.chunk_size_mib * MiB
        big = max(self.args.chunk_size_mib * 500 // 1024, 17) * MiB
        for store in self.stores.values():
            remove_tree(store)
        ctx, ctx_c = self.workdir / "ctx-chunks", self.workdir / "ctx-big"
        log("chunks: writing a %d MiB tree and a %d MiB file" % (size // MiB, big // MiB))
        edited, count = write_chunk_tree(ctx / "tree", size)
        write_big_file(ctx_c / "big" / "data.bin", big)
        self.build(ctx, "v1", "COPY tree/ /srv/tree/")
        self.build(ctx_c, "c1", "COPY big/ /srv/big/")

        first = self.add("first push (tree)", self.push("v1", True), self.push("v1", False))
        self.raw = raw = chunk_record(self.stores[True], self.images["v1"][0])["rawSize"]
        self.facts += [
            "tree layer: %d files, %.1f MiB of content (text, binary-ish, incompressible: weights %s), tar %s B;"
            % (count, size / MiB, "/".join(str(w) for _, w in CHUNK_FILE_KINDS), "{:,}".format(raw)),
            "  A edits %d B in the middle of %s (%d KiB, text) in place; B sets every mtime anew;"
            " C: one %d MiB file (random), %d B inserted at %.0f%%"
            % (EDIT_BYTES, edited.relative_to(ctx), EDIT_FILE_SIZE >> 10, big // MiB, INSERT_BYTES, INSERT_AT * 100),
            "  each rebuild: docker build --no-cache (classic builder); re-pushes into a store holding what was"
            " pushed before (chunked: DOGESTRY_CHUNKS=1; layer-level: DOGESTRY_CHUNKS=0, today's dedup)",
            "  objects counted in the directory store: files created or replaced (S3 would PUT each once)",
        ]
        edit_in_place(edited)
        self.build(ctx, "v2", "COPY tree/ /srv/tree/")
        save_a = self.save_floor("v2")
        a = self.repush("v2", "A: one file edited")
        set_mtimes(ctx / "tree", TOUCH_MTIME)
        self.build(ctx, "v3", "COPY tree/ /srv/tree/")
        save_b = self.save_floor("v3")
        b = self.repush("v3", "B: every mtime new")
        shutil.rmtree(str(ctx), ignore_errors=True)
        pulls = [named_result("pull of B's image, %s (after rmi)" % name, self.pull("v3", chunked))
                 for chunked, name in ((True, "chunked"), (False, "layer-level"))]
        self.rows.extend(pulls)

        c_first = self.add("first push (C's file)", self.push("c1", True), self.push("c1", False))
        insert_into(ctx_c / "big" / "data.bin", int(big * INSERT_AT), text_bytes(INSERT_BYTES, 99))
        self.build(ctx_c, "c2", "COPY big/ /srv/big/")
        shutil.rmtree(str(ctx_c), ignore_errors=True)
        c = self.repush("c2", "C: 1 KiB inserted")
        self.report(raw, big, first, a, b, c_first, c, save_a, save_b)
        if self.args.chunks_s3:
            self.run_s3()

    def report(self, raw, big, first, a, b, c_first, c, save_a, save_b):
        edit_target = TARGET_EDIT_SLACK + EDIT_FILE_SIZE
        touch_target = TARGET_TOUCH_SHARE * raw
        head = "%-24s %-12s %15s %15s %8s %13s %8s" % ("scenario", "store", "uploaded B", "store growth B",
                                                        "objects", "chunks new/old", "seconds")
        lines = [head, "-" * len(head)]
        for name, pair in (("first push (tree)", first), ("A: one file edited", a), ("B: every mtime new", b),
                           ("first push (C's file)", c_first), ("C: 1 KiB inserted", c)):
            for how, r in zip(("chunked", "layer-level"), pair):
                lines.append("%-24s %-12s %15s %15s %8d %13s %8.2f" % (
                    name if how == "chunked" else "", how, "{:,}".format(r.sent), "{:,}".format(r.growth),
                    sum(r.objects.values()), "%d/%d" % r.chunks, r.seconds))
            lines.append("%-24s %-12s %15s %15s %8s %13s %8s" % (
                "", "layer/chunked", ratio(pair[1].sent, pair[0].sent), ratio(pair[1].growth, pair[0].growth),
                "", "", ratio(pair[1].seconds, pair[0].seconds)))
        per_gib = sum(first[0].objects.values()) * float(1 << 30) / raw
        lines.append("objects per GiB of the tree's first push: chunked %.0f (%d objects for a %.1f MiB tar;"
                     " chunks %d), layer-level %.0f" % (per_gib, sum(first[0].objects.values()), raw / MiB,
                                                        first[0].objects["chunks"],
                                                        sum(first[1].objects.values()) * float(1 << 30) / raw))
        lines.append("C (no target): chunked uploads %s B = %.2f%% of the %d MiB file (layer-level %s B);"
                     " %d new chunk(s)" % ("{:,}".format(c[0].sent), 100.0 * c[0].sent / big, big // MiB,
                                            "{:,}".format(c[1].sent), c[0].chunks[0]))
        lines.append("engine export (docker save > /dev/null) of A's image %.2f s, of B's %.2f s: no push of"
                     " them is faster" % (save_a, save_b))
        self.lines = lines
        for name, (chunked, whole) in (("A", a), ("B", b)):
            target = edit_target if name == "A" else touch_target
            what = ("<= 2 MiB + the edited file (%d KiB) = %s B" % (EDIT_FILE_SIZE >> 10, "{:,}".format(int(target)))
                    if name == "A" else "<= %.0f%% of the layer's %s B = %s B"
                    % (TARGET_TOUCH_SHARE * 100, "{:,}".format(raw), "{:,}".format(int(target))))
            for measure, value in (("uploaded (--json bytes_sent)", chunked.sent), ("store growth", chunked.growth)):
                self.checks.append((value <= target, "chunks %s: re-push %s %s B %s  [%.2fx the target;"
                                    " layer-level %s B]" % (name, measure, "{:,}".format(value), what,
                                                            value / target, "{:,}".format(
                                                                whole.sent if "sent" in measure else whole.growth))))
            save = save_a if name == "A" else save_b
            self.checks.append((whole.seconds >= TARGET_REPUSH_SPEEDUP * chunked.seconds,
                                "chunks %s: re-push %.2f s, %.1fx faster than layer-level %.2f s (>= %.0fx; at most"
                                " %.1fx here: no push beats the engine's export, docker save %.2f s)"
                                % (name, chunked.seconds, whole.seconds / chunked.seconds, whole.seconds,
                                   TARGET_REPUSH_SPEEDUP, whole.seconds / save, save)))

    def run_s3(self):
        """The first push and A's and B's re-pushes again into radosgw, chunked and layer-level: the
        requests each sends (radosgw's access log, checked against its request counter)."""
        gw = self.state.get("rgw")
        if gw is None:
            log("chunks: starting radosgw in %s" % (self.workdir / "rgw"))
            gw = self.state["rgw"] = start_radosgw(str(self.workdir / "rgw"))
        bucket = "dgchunks-%d-%s" % (os.getpid(), os.urandom(4).hex())
        make_bucket(s3_client(load_dogestry(), gw, bucket))
        s3_env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        s3_env.update(HOME=str(home), AWS_ACCESS_KEY_ID=gw.access_key, AWS_SECRET_ACCESS_KEY=gw.secret_key,
                      AWS_ENDPOINT_URL=gw.endpoint, AWS_EC2_METADATA_DISABLED="true")
        meter, seconds = RgwMeter(gw), {}
        self.lines.append("")
        self.lines.append("S3 (radosgw %s, bucket %s): each push's requests, from radosgw's access log"
                          % (gw.endpoint, bucket))
        for label, name in (("v1", "first push (tree)"), ("v2", "A: one file edited"), ("v3", "B: every mtime new")):
            for chunked, how in ((True, "chunked"), (False, "layer-level")):
                mark = meter.mark()
                run = timed_process(dogestry_cmd(self.workdir, "push", "s3://%s/%s/" % (bucket, how), self.tag(label)),
                                    dict(s3_env, DOGESTRY_CHUNKS="1" if chunked else "0"))
                traffic = meter.traffic(mark)
                seconds[label, chunked] = run.wall
                self.rows.append(Result("S3 %s, %s" % (name, how), run.wall, None, run.rss_kib, run.cpu,
                                        lines=run.lines, note=traffic.describe()))
                self.lines.append("  %-24s %-12s %6.2f s %6d requests (%s), %s B in PUT/POST bodies" % (
                    name if chunked else "", how, run.wall, traffic.requests,
                    ", ".join("%s %d" % kv for kv in sorted(traffic.methods.items())), "{:,}".format(traffic.put_bytes)))
                if label == "v1":
                    self.lines[-1] += "; %.0f requests per GiB" % (traffic.requests * float(1 << 30) / self.raw)
        for label, name in (("v2", "A"), ("v3", "B")):
            chunked, whole = seconds[label, True], seconds[label, False]
            self.checks.append((whole >= TARGET_REPUSH_SPEEDUP * chunked,
                                "chunks %s, S3: re-push %.2f s, %.1fx faster than layer-level %.2f s (>= %.0fx)"
                                % (name, chunked, whole / chunked, whole, TARGET_REPUSH_SPEEDUP)))


def named_result(stage, result):
    """RESULT with its stage name set."""
    result.stage = stage
    return result


def ratio(numerator, denominator):
    return "%.1fx" % (numerator / denominator) if denominator else "-"


# --- report -----------------------------------------------------------------------------

def fmt(value, spec, missing="-"):
    return missing if value is None else spec % value


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def print_report(facts, image, results, floors, checks, chunks=None):
    print()
    print("=" * 108)
    print("dogestry benchmark")
    print("=" * 108)
    for line in facts:
        print("  " + line)
    print("  load average at end: %s" % loadavg())
    print("  this script's own peak RSS: %.1f MiB (not in the RSS column, which is each child's VmHWM)"
          % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    print("  image: %s  %s" % (TAG, image["id"]))
    print("    layers (diffID, kind): %s" % ", ".join(image["layers"]))
    print("    saved tar %.1f MiB (%.1f MB); every MB/s below is of this size, except the S3 floors'"
          " (of the object they move)" % (image["tar"] / MiB, image["tar"] / MB))
    for line in list(image.get("fleet", ())) + list(image.get("s3", ())):
        print("  " + line)
    print()
    head = "%-44s %8s %8s %8s %7s %7s %9s  %s" % ("stage", "seconds", "MB/s", "RSS MiB", "CPU s",
                                                    "eng CPU", "fetch MB", "vs floor")
    print(head)
    print("-" * len(head))
    for r in results:
        if isinstance(r, str):  # a section heading
            print(r)
            continue
        ratio = ""
        if r.stage in floors:
            name, seconds = floors[r.stage]
            ratio = "%.2fx %s" % (r.seconds / seconds, name)
        print("%-44s %8.2f %8s %8s %7s %7s %9s  %s" % (r.stage, r.seconds, fmt(r.mbps, "%.1f"),
                                                       fmt(r.rss_kib and r.rss_kib / 1024, "%.1f"),
                                                       fmt(r.cpu, "%.2f"), fmt(r.engine_cpu, "%.2f"),
                                                       fmt(r.fetched and r.fetched / MB, "%.1f"), ratio))
        for line in r.note.split("\n") if r.note else ():
            print("%-46s%s" % ("", line))
    print("(CPU s: the measured process itself, or this script's threads for gzip and the S3 floors;"
          " eng CPU: dockerd + containerd,")
    print(" of every host a fleet pull loads; fetch MB: bytes fetched from the store, see each fleet row's note)")
    print()
    if chunks is not None:
        print_chunk_table(chunks)
    print("targets")
    print("-------")
    for ok, text in checks:
        print("  %s  %s" % ("PASS" if ok else "FAIL", text))
    print()
    print("dogestry output (t = seconds since the process started; the best run of each stage)")
    print("------------------------------------------------------------------------------------")
    for r in results:
        if not isinstance(r, str) and r.lines:
            print("  %s:" % r.stage)
            for t, line in r.lines:
                print("    %6.2f  %s" % (t, line))
    sys.stdout.flush()


def print_chunk_table(stage):
    """The chunk stage's own table: what each push uploaded and wrote, chunked beside layer-level."""
    print("sub-layer dedup (directory stores)")
    print("----------------------------------")
    for line in stage.facts + [""] + stage.lines:
        print("  " + line)
    print()


def print_chunks(facts, stage):
    """The chunk stage alone (--chunks-only)."""
    print()
    for line in facts:
        print("  " + line)
    print("  load average at end: %s" % loadavg())
    print()
    head = "%-44s %8s %8s %7s  %s" % ("stage", "seconds", "RSS MiB", "CPU s", "")
    print(head)
    print("-" * len(head))
    for r in stage.rows:
        print("%-44s %8.2f %8s %7s" % (r.stage, r.seconds, fmt(r.rss_kib and r.rss_kib / 1024, "%.1f"),
                                      fmt(r.cpu, "%.2f")))
        for line in r.note.split("\n") if r.note else ():
            print("%-46s%s" % ("", line))
    print()
    print_chunk_table(stage)
    print("targets")
    print("-------")
    for ok, text in stage.checks:
        print("  %s  %s" % ("PASS" if ok else "FAIL", text))
    sys.stdout.flush()


def print_startup(rows, checks):
    """The start-up stage alone (--startup-only)."""
    print()
    print("python: %s (%s); load average: %s" % (platform.python_version(), sys.executable, loadavg()))
    for r in rows:
        print(r if isinstance(r, str) else "%-46s %8.3f s  %s" % (r.stage, r.seconds, r.note))
    for ok, text in checks:
        print("  %s  %s" % ("PASS" if ok else "FAIL", text))
    sys.stdout.flush()


# --- main -------------------------------------------------------------------------------

def start_engine(state, workdir):
    """DOCKER_HOST's engine, or our own dockerd in the work dir: (host, handle or None)."""
    if not find_docker():
        raise BenchError("docker CLI not found on PATH (install docker.io)")
    if os.environ.get("DOCKER_HOST"):
        host, handle = os.environ["DOCKER_HOST"], None
        log("using DOCKER_HOST=%s" % host)
    else:
        log("starting dockerd in %s" % (workdir / "docker"))
        handle = start_dockerd(workdir / "docker")
        state["dockerd"] = handle
        host = handle.host
    state["host"] = host
    return host, handle


def run_chunks(args, state, workdir, host, handle):
    """The sub-layer dedup stage (ChunkStage); it, run."""
    log("chunks: scenarios A-D at %d MiB (tree layer) and %d MiB (C's file)"
        % (args.chunk_size_mib, max(args.chunk_size_mib * 500 // 1024, 17)))
    stage = ChunkStage(args, state, workdir, host, handle, client_env(host))
    stage.run()
    return stage


def run(args, state):
    """The whole benchmark; STATE records what to clean up."""
    base = args.workdir or tempfile.gettempdir()
    workdir = Path(tempfile.mkdtemp(prefix="dgstbench", dir=base)).resolve()
    state["workdir"] = workdir
    (workdir / "tmp").mkdir()
    build_zipapp(workdir)
    if args.chunks_only:
        host, handle = start_engine(state, workdir)
        facts = machine_facts(host, workdir)
        stage = run_chunks(args, state, workdir, host, handle)
        print_chunks(facts, stage)
        return
    log("start-up: python3 -c pass against dogestry.pyz version, help, a usage error, list (%d runs each)"
        % args.startup_runs)
    startup, startup_checks = measure_startup(workdir, args.startup_runs)
    if args.startup_only:
        print_startup(startup, startup_checks)
        return
    size_bytes = args.size_mib * MiB
    host, handle = start_engine(state, workdir)
    env = client_env(host)
    engine = EngineCpu(handle)
    docker = find_docker()
    facts = machine_facts(host, workdir)

    log("generating a %d MiB image (random / text / mixed layers)" % args.size_mib)
    t = time.perf_counter()
    state["image_built"] = True
    img = build_bench_image(host, workdir, size_bytes)
    if not img:
        raise BenchError("docker build produced no image %s" % TAG)
    diff_ids = json.loads(docker_cli(host, "image", "inspect", "-f", "{{json .RootFS.Layers}}", TAG).stdout)
    log("built %s in %.1f s" % (img[7:19], time.perf_counter() - t))

    results, floors = list(startup), {}
    save_path = workdir / "image.tar"
    s3cpu = None  # CPU of the S3 daemons, once they run
    tar_bytes = None

    def add(result):
        results.append(result)
        log("%s: %.2f s%s" % (result.stage.strip(), result.seconds,
                              " (%.1f MB/s)" % result.mbps if result.mbps else ""))
        return result

    def measure_save(dest):
        e0 = engine.now()
        at_first_byte = []

        def mark():
            at_first_byte.append(engine.now())

        cmd = [docker, "-H", host, "save", TAG]
        if dest is None:
            run = timed_process(cmd, env, sink=None, on_first_byte=mark)
        else:
            with open(str(dest), "wb") as f:
                run = timed_process(cmd, env, sink=f, on_first_byte=mark)
        result = Result("", run.wall, tar_bytes, engine_cpu=engine.since(e0))
        result.first_byte = run.first_byte
        result.stream_cpu = engine.since(at_first_byte[0]) if at_first_byte else None
        result.note = "first byte after %.2f s (the engine exports before it streams)" % run.first_byte
        if result.stream_cpu is not None:
            result.note += "; engine CPU while streaming %.2f s" % result.stream_cpu
        return result

    def measure_load(path=None):
        """docker load of PATH (default: the saved tar) after docker rmi; the image ID must come back."""
        remove_image(host, TAG, diff_ids, handle)
        e0 = engine.now()
        run = timed_process([docker, "-H", host, "load", "-q"], env, sink=None, stdin_path=path or save_path)
        result = Result("", run.wall, tar_bytes, engine_cpu=engine.since(e0),
                        note="tar sent after %.2f s, engine busy %.2f s more"
                        % (run.input_done, run.wall - run.input_done))
        if image_id(host, TAG) != img:
            raise BenchError("docker load gave image %s, not %s" % (image_id(host, TAG), img))
        return result

    def measure_dogestry(*cmd_args, store=None, fresh=True, pull=False, moves_image=True,
                         run_env=None, reset=None, holds=None, also=None):
        """RESET() empties a store that is not a directory, HOLDS() says what it holds, ALSO(seconds)
        (with S3 daemons' CPU seconds) adds to the note."""
        if fresh and store is not None:
            remove_tree(store)
        if fresh and reset is not None:
            reset()
        if pull:
            remove_image(host, TAG, diff_ids, handle)
        e0 = engine.now()
        s0 = s3cpu.now() if s3cpu is not None else None
        run = timed_process(dogestry_cmd(workdir, *cmd_args), run_env or env)
        s3_cpu = s3cpu.since(s0) if s3cpu is not None else None
        result = Result("", run.wall, tar_bytes if moves_image else None, run.rss_kib, run.cpu,
                        engine.since(e0), run.lines)
        notes = []
        if pull:
            pulled = image_id(host, TAG)
            if pulled != img:
                raise BenchError("dogestry pull gave image %s, not %s" % (pulled, img))
            notes.append("image ID after pull: the same")
        elif store is not None:
            notes.append("store holds %.1f MiB" % (dir_bytes(store) / MiB))
        elif holds is not None and moves_image:
            notes.append(holds())
        if also is not None:
            notes.append(also(run.wall, s3_cpu))
        result.note = "; ".join(n for n in notes if n)
        return result

    def named(stage, result):
        result.stage = stage
        return result

    # floors: save to /dev/null (and to a file: the input of the gzip and load floors)
    with open(str(save_path), "wb") as f:  # warm-up, and the tar the other floors use
        timed_process([docker, "-H", host, "save", TAG], env, sink=f)
    tar_bytes = save_path.stat().st_size
    layer_kinds = [k for k, _ in LAYER_KINDS]
    image = {"id": img, "tar": tar_bytes,
             "layers": ["%s %s" % (d[7:19], k) for d, k in zip(diff_ids, layer_kinds)]}
    # the save floor in turns with the two pushes judged against it (the gzip push by a bound
    # made of the save's first byte and CPU measures, the other by the save itself)
    store_gz, store_raw = workdir / "store-gzip", workdir / "store-raw"
    save_run, push_run, raw_run = best_of_interleaved(
        args.repeat, lambda: measure_save(None),
        lambda: measure_dogestry("push", store_gz, TAG, store=store_gz),  # the last run leaves the store full
        lambda: measure_dogestry("push", "--compress", "none", store_raw, TAG, store=store_raw))
    save = add(named("floor: docker save > /dev/null", save_run))
    save_file = add(named("  (docker save > file on the work disk)",
                          best_of(args.repeat, lambda: measure_save(save_path))))

    workers = os.cpu_count() or 1

    def measure_gzip(fn, *extra, input_bytes=None):
        wall, cpu, size = fn(str(save_path), *extra)
        input_bytes = input_bytes or tar_bytes
        return Result("", wall, tar_bytes, cpu=cpu,
                      note="%.1f MiB -> %.1f MiB (%.0f%%)" % (input_bytes / MiB, size / MiB,
                                                            100.0 * size / input_bytes))

    add(named("  (gzip -1 of the saved tar, 1 thread)", best_of(args.repeat, lambda: measure_gzip(gzip_single))))
    gzip_floor = add(named("floor: gzip -1, 2 MiB members, %d threads" % workers,
                           best_of(args.repeat, lambda: measure_gzip(gzip_parallel, workers))))
    ranges = compressible_layer_ranges(save_path)
    compressible = add(named("  (same, only layers dogestry compresses: %d)" % len(ranges),
              best_of(args.repeat, lambda: measure_gzip(gzip_parallel, workers, ranges,
                                                          input_bytes=sum(n for _, n in ranges)))))
    slowest = max((save, gzip_floor), key=lambda r: r.seconds)
    # No push can start before the engine's first byte; after it, the cores must at least
    # stream (the engine's CPU), hash every byte once and gzip the layers that compress:
    # a lower bound for any push on this machine (reading and writing cost more still).
    sha_cpu = sha256_cpu(save_path)
    push_bound = save.first_byte + (compressible.cpu + (save.stream_cpu or 0.0) + sha_cpu) / workers
    push_floor = ("save" if slowest is save else "gzip", slowest.seconds)

    # dogestry push, re-push, push --compress none (the image is on the engine for all three)
    push = add(named("dogestry push (gzip, empty store)", push_run))
    floors[push.stage] = push_floor
    repush = add(named("dogestry re-push (unchanged image)",
                       best_of(args.repeat, lambda: measure_dogestry("push", store_gz, TAG, moves_image=False))))
    raw = add(named("dogestry push --compress none (reference)", raw_run))
    floors[raw.stage] = ("save", save.seconds)

    # floor: docker load of the saved tar into an engine without the image's layers, in turns
    # with dogestry pull into an engine without the image's layers
    load_run, pull_run = best_of_interleaved(
        args.repeat, measure_load, lambda: measure_dogestry("pull", store_gz, TAG, pull=True))
    load = add(named("floor: docker load < saved tar (after rmi)", load_run))
    pull = add(named("dogestry pull (gzip store, after rmi)", pull_run))
    floors[pull.stage] = ("load", load.seconds)
    pull_raw = add(named("dogestry pull (--compress none store)",
                         best_of(args.repeat, lambda: measure_dogestry("pull", store_raw, TAG, pull=True))))
    floors[pull_raw.stage] = ("load", load.seconds)

    # archives: import of the saved tar into an empty store (no engine); export from the gzip store
    results.append("-- archives: import of the saved tar into an empty store; export of the image from the gzip"
                   " store to a file on the work disk")
    store_imp = workdir / "store-import"
    gz_listing = dir_listing(store_gz)

    def measure_import():
        result = measure_dogestry("import", store_imp, save_path, store=store_imp)
        output_has(result.lines, "Imported image: %s" % TAG)
        listing = dir_listing(store_imp)
        check_stored("the import's store", listing, lambda key: (store_imp / key).read_bytes(), img, TAG, diff_ids)
        result.note += "; tag, config, manifest and blobs checked;\n  " + compare_listings(
            listing, gz_listing, "push's store")
        return result

    imported = add(named("dogestry import (saved tar, empty store)", best_of(args.repeat, measure_import)))
    floors[imported.stage] = ("push", push.seconds)
    imp_pull = add(named("  (pull from the import's store, after rmi)",
                         measure_dogestry("pull", store_imp, TAG, pull=True)))
    floors[imp_pull.stage] = ("load", load.seconds)
    exports = {"docker": workdir / "export-docker.tar", "oci": workdir / "export-oci.tar"}

    def measure_export(fmt):
        path = exports[fmt]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        result = measure_dogestry("export", "--format", fmt, store_gz, TAG, "-o", path)
        result.note = "%.1f MiB written; %s" % (path.stat().st_size / MiB,
                                               verify_archive(path, fmt, img, diff_ids, TAG))
        if fmt == "oci" and shutil.which("skopeo"):
            config = subprocess.run(["skopeo", "inspect", "--raw", "--config", "oci-archive:%s" % path],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if config.returncode != 0 or "sha256:" + hashlib.sha256(config.stdout).hexdigest() != img:
                raise BenchError("skopeo inspect --raw --config oci-archive:%s: exit %d, config %s, not %s: %s" % (
                    path, config.returncode, hashlib.sha256(config.stdout).hexdigest()[:12], img[7:19],
                    config.stderr.decode("utf-8", "replace").strip()))
            result.note += ";\n  skopeo inspect --raw --config reads the image's config from it"
        return result

    exported = add(named("dogestry export -o FILE (docker format)",
                         best_of(args.repeat, lambda: measure_export("docker"))))
    floors[exported.stage] = ("save > file", save_file.seconds)
    exported_oci = add(named("dogestry export -o FILE --format oci",
                             best_of(args.repeat, lambda: measure_export("oci"))))
    floors[exported_oci.stage] = ("save > file", save_file.seconds)
    export_load = add(named("  (docker load of the export, after rmi)", measure_load(exports["docker"])))
    floors[export_load.stage] = ("load", load.seconds)
    export_load.note += "; image ID after load: the same"

    # the fleet: three more dockerds, each lacking every layer before every run
    fleet, fleet_checks = [], []
    tcp_load = None

    def clear_fleet():
        for h in fleet:
            remove_image(h.tcp, TAG, diff_ids, h, missing_ok=True)

    def fleet_cpu(hosts):
        return PidsCpu([p for h in hosts for p in (h.pid, h.containerd_pid) if p])

    def measure_tcp_load():
        clear_fleet()
        h = fleet[0]
        cpu = fleet_cpu([h])
        e0 = cpu.now()
        run = timed_process([docker, "-H", h.tcp, "load", "-q"], client_env(h.tcp), sink=None,
                            stdin_path=save_path)
        result = Result("", run.wall, tar_bytes, engine_cpu=cpu.since(e0),
                        note="into %s; tar sent after %.2f s, engine busy %.2f s more"
                        % (h.tcp, run.input_done, run.wall - run.input_done))
        if image_id(h.tcp, TAG) != img:
            raise BenchError("docker load into %s gave image %s, not %s" % (h.tcp, image_id(h.tcp, TAG), img))
        return result

    def measure_fleet(store_arg, hosts, layers, run_env=None, opens=None, meter=None, bucket=None):
        """dogestry -pullhosts HOSTS pull STORE_ARG TAG after clearing every fleet host; bytes fetched
        from the store come from METER (radosgw) or OPENS (inotify on a directory store's blobs)."""
        clear_fleet()
        cpu = fleet_cpu(hosts)
        if opens is not None:
            opens.take()
        mark = meter.mark() if meter is not None else None
        e0, s0 = cpu.now(), (s3cpu.now() if meter is not None and s3cpu is not None else None)
        run = timed_process(dogestry_cmd(workdir, "-pullhosts", ",".join(h.tcp for h in hosts),
                                         "pull", store_arg, TAG), run_env or env)
        engine_s = cpu.since(e0)
        daemons_s = s3cpu.since(s0) if s0 is not None else None
        statuses = None
        for _, line in run.lines:
            if line.startswith("[{"):
                statuses = json.loads(line)
        if statuses is None or sorted(st.get("Host") for st in statuses) != sorted(h.tcp for h in hosts) \
                or any(st.get("Status") != "ok" for st in statuses):
            raise BenchError("dogestry -pullhosts: host statuses %s" % statuses)
        for h in hosts:
            if image_id(h.tcp, TAG) != img:
                raise BenchError("dogestry -pullhosts gave %s image %s, not %s"
                                 % (h.tcp, image_id(h.tcp, TAG), img))
        sizes = {hexd: size for hexd, size in layers.values()}
        downloaded = downloaded_blobs(run.lines, layers)
        notes = ["%d host%s ok, image ID the same on %s" % (len(hosts), "s" if len(hosts) > 1 else "",
                                                             "each" if len(hosts) > 1 else "it")]
        if len(hosts) > 1:
            notes[0] += "; %d x the image = %.1f MB/s into the hosts" % (
                len(hosts), len(hosts) * tar_bytes / run.wall / MB)
        if meter is not None:
            served = meter.served(mark, bucket, S3_PREFIX)
            fetched, blob_fetch = served.fetched, dict(served.blobs)
            notes.append("fetched %s B: %s" % ("{:,}".format(fetched), served.describe(layers)))
        else:
            opened = opens.take()
            blob_opens = {n[len(BLOB_DIR) + 1:]: c for n, c in opened.items() if n.startswith(BLOB_DIR + "/")}
            stray = sorted(n for n in blob_opens if n not in sizes)
            if stray:
                raise BenchError("dogestry opened files in the blob dir that are not this image's: %s" % stray)
            blob_fetch = {n: sizes[n] * c for n, c in blob_opens.items()}
            other = {n: c for n, c in opened.items() if not n.startswith(BLOB_DIR + "/")}
            other_bytes = sum((store_arg / n).stat().st_size * c for n, c in other.items())
            fetched = sum(blob_fetch.values()) + other_bytes
            notes.append("fetched %s B: inotify saw %d blob file opens (%d of %d blobs exactly once) x their sizes"
                         " = %s B,\n  %d other file opens (tag, image config, manifest) %s B"
                         % ("{:,}".format(fetched), sum(blob_opens.values()),
                            sum(1 for c in blob_opens.values() if c == 1), len(sizes),
                            "{:,}".format(sum(blob_fetch.values())), sum(other.values()),
                            "{:,}".format(other_bytes)))
        down = sum(n for _, n in downloaded)
        notes.append("dogestry's 'downloaded' lines: %d blobs, %s B%s"
                     % (len(downloaded), "{:,}".format(down),
                        "" if down == sum(blob_fetch.values()) else " (the store's count of blob bytes differs)"))
        if daemons_s is not None:
            notes[-1] += "; S3 daemons CPU %.2f s" % daemons_s
        result = Result("", run.wall, tar_bytes, run.rss_kib, run.cpu, engine_s, run.lines, "\n".join(notes),
                        fetched=fetched)
        result.blob_fetch, result.downloaded = blob_fetch, down
        return result

    def check_fleet(what, one, three, layers):
        """Targets: 3 hosts fetch what 1 host does, and that is every blob of the image exactly once."""
        blobs = {hexd: size for hexd, size in layers.values()}
        total = sum(blobs.values())
        return [
            (three.fetched == one.fetched and three.blob_fetch == one.blob_fetch,
             "%s: 3 hosts fetched %s B from the store, 1 host %s B (the union of missing layers once)"
             % (what, "{:,}".format(three.fetched), "{:,}".format(one.fetched))),
            (one.blob_fetch == blobs == three.blob_fetch and one.downloaded == total == three.downloaded,
             "%s: each of the image's %d blobs (%s B) fetched exactly once, by 1 host and by 3 hosts;"
             " dogestry's 'downloaded' lines agree" % (what, len(blobs), "{:,}".format(total))),
        ]

    if args.fleet:
        log("starting the fleet: %d dockerds on %s" % (len(FLEET_ADDRESSES), ", ".join(
            "tcp://%s:%d" % (a, FLEET_PORT) for a in FLEET_ADDRESSES)))
        fleet = start_fleet(workdir, state)
        image["fleet"] = [
            "fleet: %d more dockerds (vfs, own data roots in the work dir): %s"
            % (len(fleet), ", ".join(h.tcp for h in fleet)),
            "  before every fleet run the image is removed from all of them and its layers are checked gone"
            " (image ls,",
            "  inspect, the layerdb), so every host lacks every layer; no dogestry server listens next to them"
            " (port %d)," % SERVER_PORT,
            "  so dogestry pulls itself: checks the hosts, spools the missing layers once, loads the hosts"
            " in parallel",
        ]
        results.append("-- fleet: dogestry -pullhosts to 1 host (%s) and to 3 hosts; MB/s of one image"
                       % fleet[0].tcp)
        tcp_load = add(named("floor: docker load over TCP (fresh host)", best_of(args.repeat, measure_tcp_load)))
        gz_layers = stored_layers((store_gz / "images" / img[7:] / "manifest.json").read_bytes())
        opens = FileOpens(store_gz, [BLOB_DIR, "images/" + img[7:], "layers",
                                     "repositories/" + TAG.rsplit(":", 1)[0]])
        try:
            one = add(named("fleet pull, gzip dir store, 1 host", best_of(args.repeat, lambda: measure_fleet(
                store_gz, fleet[:1], gz_layers, opens=opens))))
            three = add(named("fleet pull, gzip dir store, 3 hosts", best_of(args.repeat, lambda: measure_fleet(
                store_gz, fleet, gz_layers, opens=opens))))
        finally:
            opens.close()
        floors[one.stage] = floors[three.stage] = ("TCP load", tcp_load.seconds)
        fleet_checks += check_fleet("fleet, dir store", one, three, gz_layers)

    def run_multiplatform():
        """A two-platform image (this machine's architecture and the other of amd64/arm64): one
        layer both share, one of each platform's own, built by buildah.  Import of its two-platform
        OCI archive against importing each platform's own archive, one after the other, into one
        store (the single-platform work it contains); -pullhosts of its tag to two hosts, one real and
        one behind a relay whose GET /version says the other architecture (tests/multiplatform.py's
        ReportedArch), against pulling each host its platform alone.  Targets: no slower, and every
        blob of the two images stored, and read from the store, exactly once."""
        from faultproxy import FaultProxy, started_servers
        from multiplatform import ReportedArch
        real = docker_cli(fleet[1].tcp, "version", "-f", "{{.Server.Arch}}").stdout.strip()
        other = "arm64" if real != "arm64" else "amd64"
        arches = (real, other)
        work = workdir / "multi"
        ctx = work / "ctx"
        part = size_bytes // 4
        log("multi-platform: writing a context of a shared layer and one per platform (%d MiB each)" % (part // MiB))
        write_layer_files(ctx / "shared", "random", LAYER_KINDS[0][1], part)
        for n, arch in enumerate(arches):
            write_layer_files(ctx / ("plat-" + arch), "mixed", lambda size, seed, n=n: mixed_bytes(size, seed + n + 1),
                              part)
        (ctx / "Dockerfile").write_text("FROM scratch\nARG TARGETARCH\nCOPY shared/ /\nCOPY plat-${TARGETARCH}/ /\n")
        buildah = ["buildah", "--storage-driver", "vfs", "--root", str(work / "b-root"), "--runroot", str(work / "b-run")]

        def bud(*cmd):
            proc = subprocess.run(buildah + [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=1800)
            if proc.returncode != 0:
                raise BenchError("buildah %s: %s" % (" ".join(map(str, cmd[:2])), proc.stderr.strip()[-500:]))
            return proc.stdout

        ref = "dogestry-bench/multi:%d" % os.getpid()
        t = time.perf_counter()
        bud("manifest", "create", "mp")
        archives = {}
        for arch in arches:
            bud("build", "-q", "--layers", "--build-arg", "TARGETARCH=" + arch, "--arch", arch, "--manifest", "mp",
                "-t", "mp-" + arch, "-f", ctx / "Dockerfile", ctx)
            archives[arch] = work / ("%s.tar" % arch)
            bud("push", "-q", "mp-" + arch, "oci-archive:%s:%s" % (archives[arch], ref))
        both = work / "both.tar"
        bud("manifest", "push", "-q", "--all", "mp", "oci-archive:%s:%s" % (both, ref))
        shutil.rmtree(str(ctx))
        log("multi-platform: built and archived in %.1f s (%s, %.1f MiB)" % (time.perf_counter() - t, both.name,
                                                                             both.stat().st_size / MiB))
        results.append("-- multi-platform: a %s + %s image (a shared layer, one of each's own); import of its"
                       " OCI archive, -pullhosts to a mixed fleet" % arches)
        singles_store, both_store = work / "store-singles", work / "store-both"

        def blobs_of(store):
            return {p.name: p.stat().st_size for p in (store / BLOB_DIR).iterdir() if not p.name.startswith(".")}

        def import_singles():
            remove_tree(singles_store)
            runs = [measure_dogestry("import", singles_store, archives[arch], store=singles_store, fresh=False,
                                     moves_image=False) for arch in arches]
            return Result("", sum(r.seconds for r in runs), both.stat().st_size, max(r.rss_kib for r in runs),
                          sum(r.cpu for r in runs), lines=runs[0].lines + runs[1].lines,
                          note="%s then %s, into one store: %d blobs, %.1f MiB"
                          % (archives[real].name, archives[other].name, len(blobs_of(singles_store)),
                             sum(blobs_of(singles_store).values()) / MiB))

        def import_both():
            result = measure_dogestry("import", both_store, both, store=both_store, moves_image=False)
            result.nbytes = both.stat().st_size
            result.note = "%d blobs, %.1f MiB; the tag holds the archive's index" % (
                len(blobs_of(both_store)), sum(blobs_of(both_store).values()) / MiB)
            return result

        singles, together = best_of_interleaved(args.repeat, import_singles, import_both)
        singles = add(named("floor: import each platform's archive", singles))
        together = add(named("dogestry import, two-platform archive", together))
        floors[together.stage] = ("each platform", singles.seconds)
        index_hex = (both_store / "repositories" / ref.replace(":", "/")).read_text().strip()[len("@sha256:"):]
        index = json.loads((both_store / "manifests" / "sha256" / index_hex).read_bytes())
        archived_index = json.loads(subprocess.run(["tar", "-xOf", str(both), "index.json"], stdout=subprocess.PIPE,
                                                   check=True).stdout)["manifests"][0]["digest"]
        images = {}  # arch -> (image ID, {blob hex: size})
        for entry in index["manifests"]:
            child = json.loads((both_store / "manifests" / "sha256" / entry["digest"][7:]).read_bytes())
            images[entry["platform"]["architecture"]] = (
                child["config"]["digest"], {d["digest"][7:]: d["size"] for d in child["layers"]})
        union = {h: n for _, blobs in images.values() for h, n in blobs.items()}
        checks = [
            ("sha256:" + index_hex == archived_index and blobs_of(both_store) == union == blobs_of(singles_store),
             "multi-platform import: the tag holds the archive's index %s; the store holds each of the two images'"
             " %d blobs (%.1f MiB) once, as importing each platform alone does" % (index_hex[:12], len(union),
                                                                                 sum(union.values()) / MiB)),
            (together.seconds <= singles.seconds,
             "multi-platform import %.2f s <= importing each platform's archive %.2f s  [%.2fx]"
             % (together.seconds, singles.seconds, together.seconds / singles.seconds)),
        ]

        with started_servers(lambda: FaultProxy(fleet[2].tcp.replace("tcp://", "http://"), ReportedArch(
                fleet[2].tcp.replace("tcp://", "http://"), other), name="engine-relay",
                address=loopback_addresses(1)[0])) as start:
            relay = start().url.replace("http://", "tcp://")
            hosts = {real: fleet[1].tcp, other: relay}
            engines = {real: fleet[1], other: fleet[2]}
            opens = FileOpens(both_store, [BLOB_DIR])

            def clear():
                clear_fleet()  # the fleet stage's image too: the hosts must hold no layer at all
                for arch, handle in engines.items():
                    docker_cli(handle.tcp, "rmi", "-f", ref, check=False)
                    for image_hex, _ in images.values():
                        docker_cli(handle.tcp, "rmi", "-f", image_hex, check=False)
                    if engine_chains(handle.tcp):
                        raise BenchError("%s still holds layers after rmi" % handle.tcp)

            def pull(arches_, platform=None):
                extra = ["--platform", "linux/" + arches_[0]] if platform else []
                run_ = timed_process(dogestry_cmd(workdir, "-pullhosts", ",".join(hosts[a] for a in arches_), "pull",
                                                  *extra, both_store, ref), env)
                statuses = [json.loads(line) for _, line in run_.lines if line.startswith("[{")]
                if not statuses or any(st.get("Status") != "ok" for st in statuses[-1]):
                    raise BenchError("dogestry -pullhosts (multi-platform): %s" % (statuses or run_.lines[-5:]))
                for arch in arches_:
                    if image_id(engines[arch].tcp, ref) != images[arch][0]:
                        raise BenchError("%s got %s, not the %s image" % (hosts[arch], image_id(engines[arch].tcp, ref),
                                                                          arch))
                return run_

            def pull_singles():
                clear()
                opens.take()
                runs = [pull([arch], platform=True) for arch in arches]
                read = opens.take()
                return Result("", sum(r.wall for r in runs), 2 * both.stat().st_size, max(r.rss_kib for r in runs),
                              sum(r.cpu for r in runs), lines=runs[0].lines + runs[1].lines,
                              note="blob opens: %d" % sum(read.values()), fetched=sum(
                                  union[n.split("/")[-1]] * c for n, c in read.items()))

            def pull_fleet():
                clear()
                opens.take()
                run_ = pull(list(arches))
                read = opens.take()
                result = Result("", run_.wall, 2 * both.stat().st_size, run_.rss_kib, run_.cpu, lines=run_.lines,
                                fetched=sum(union[n.split("/")[-1]] * c for n, c in read.items()))
                result.opens = read
                result.note = "%s -> %s image, %s (relay: GET /version says %s) -> %s image; blob opens: %d of %d" \
                    " blobs, each %s" % (hosts[real], real, relay, other, other, sum(read.values()), len(union),
                                         "once" if sorted(read.values()) == [1] * len(union) else "NOT once")
                return result

            try:
                alone, mixed = best_of_interleaved(args.repeat, pull_singles, pull_fleet)
            finally:
                opens.close()
            alone = add(named("floor: -pullhosts of each platform alone", alone))
            mixed = add(named("dogestry -pullhosts, mixed fleet of 2", mixed))
            floors[mixed.stage] = ("each alone", alone.seconds)
        checks += [
            ({n.split("/")[-1]: c for n, c in mixed.opens.items()} == {h: 1 for h in union},
             "multi-platform -pullhosts: each of the two images' %d blobs (%.1f MiB) read from the store exactly once"
             " (%.1f MiB read; each platform pulled alone: %.1f MiB)"
             % (len(union), sum(union.values()) / MiB, mixed.fetched / MiB, alone.fetched / MiB)),
            (mixed.seconds <= alone.seconds,
             "multi-platform -pullhosts to 2 hosts %.2f s <= pulling each host its platform alone %.2f s  [%.2fx]"
             % (mixed.seconds, alone.seconds, mixed.seconds / alone.seconds)),
        ]
        remove_tree(singles_store)
        return checks

    if fleet and args.multiplatform:
        fleet_checks += run_multiplatform()

    # the S3 store: floors of the bytes dogestry stores, then dogestry push / re-push / pull
    def run_s3():
        nonlocal s3cpu
        dogestry = load_dogestry()
        log("starting radosgw in %s" % (workdir / "rgw"))
        try:
            gw = start_radosgw(str(workdir / "rgw"))
        except RadosGWError as e:
            if not args.s3_auto:
                raise
            log("radosgw did not start; S3 skipped (--s3 makes this an error): %s" % e)
            image["s3"] = ["S3: skipped, radosgw did not start: %s" % str(e).splitlines()[0]]
            return []
        state["rgw"] = gw
        s3cpu = PidsCpu(gw.pids().values())
        version = subprocess.run(["radosgw", "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 universal_newlines=True).stdout.split(" (")[0].strip()
        log("radosgw up at %s in %.1f s" % (gw.endpoint, gw.startup_seconds))
        bucket = "dgbench-%d-%s" % (os.getpid(), os.urandom(4).hex())
        client = s3_client(dogestry, gw, bucket)
        make_bucket(client)

        # the floor object: the blobs of the gzip store (what dogestry stores) back to back
        blob_dir = store_gz / "blobs" / "sha256"
        blobs = sorted(blob_dir.iterdir())
        obj = workdir / "s3-object.bin"
        with open(str(obj), "wb") as out:
            for blob in blobs:
                with open(str(blob), "rb") as f:
                    shutil.copyfileobj(f, out, MiB)
        size = obj.stat().st_size
        t = time.perf_counter()
        sha = dogestry.file_sha256(str(obj))
        hash_s = time.perf_counter() - t
        parts = part_ranges(size, S3_PART)
        t = time.perf_counter()
        part_hashes = file_part_hashes(obj, parts)
        part_hash_s = time.perf_counter() - t
        touch_s = touch_memory(WARMUP_TOUCH)
        t = time.perf_counter()
        s3_put_single(dogestry, client, "floor/warm-up", obj, size, sha)
        warm_put = time.perf_counter() - t
        t = time.perf_counter()
        s3_get_single(client, "floor/warm-up", size)
        warm_get = time.perf_counter() - t
        log("S3 warm-up: touched %d MiB in %.2f s; PUT %.2f s, GET %.2f s of %.1f MiB"
            % (WARMUP_TOUCH // MiB, touch_s, warm_put, warm_get, size / MiB))
        image["s3"] = [
            "S3: %s, one OSD (bluestore on a sparse file in the work dir), %s, started in %.1f s; bucket %s"
            % (version or "radosgw", gw.endpoint, gw.startup_seconds, bucket),
            "  floor object: the %d blobs of the gzip store back to back = the bytes dogestry stores,"
            " %.1f MiB (%.1f MB)" % (len(blobs), size / MiB, size / MB),
            "  not timed: its sha256 %.2f s, its 8 MiB parts' sha256 %.2f s; warm-up first: %d MiB of"
            " memory touched (%.2f s), one PUT %.2f s + GET %.2f s of the object"
            % (hash_s, part_hash_s, WARMUP_TOUCH // MiB, touch_s, warm_put, warm_get),
        ]

        def measure_floor(fn, *fn_args, note=""):
            s0, c0, t0 = s3cpu.now(), time.process_time(), time.perf_counter()
            fn(*fn_args)
            wall = time.perf_counter() - t0
            return Result("", wall, size, cpu=time.process_time() - c0,
                          note="%s%.1f MB/s of the saved tar; S3 daemons CPU %.2f s"
                          % (note, tar_bytes / wall / MB, s3cpu.since(s0)))

        results.append("-- S3 store: radosgw on %s, bucket %s; S3 floors move the %.1f MB object"
                       % (gw.endpoint, bucket, size / MB))
        put1 = add(named("S3 floor: PUT, 1 request",
                         best_of(args.repeat, lambda: measure_floor(
                             s3_put_single, dogestry, client, "floor/single", obj, size, sha))))
        putm = add(named("S3 floor: PUT, %d MiB parts, %d conns" % (S3_PART // MiB, S3_STREAMS),
                         best_of(args.repeat, lambda: measure_floor(
                             s3_put_multipart, dogestry, client, "floor/multipart", obj, size, parts,
                             part_hashes, S3_STREAMS, note="%d parts; " % len(parts)))))
        get1 = add(named("S3 floor: GET, 1 request",
                         best_of(args.repeat, lambda: measure_floor(s3_get_single, client, "floor/single", size))))
        getr = add(named("S3 floor: GET, %d MiB ranges, %d conns" % (S3_PART // MiB, S3_STREAMS),
                         best_of(args.repeat, lambda: measure_floor(
                             s3_get_ranges, client, "floor/single", size, S3_PART, S3_STREAMS))))
        s3_put = min((put1, putm), key=lambda r: r.seconds)
        s3_get = min((get1, getr), key=lambda r: r.seconds)

        s3_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        home = workdir / "home"
        home.mkdir(exist_ok=True)
        s3_env.update(HOME=str(home), AWS_ACCESS_KEY_ID=gw.access_key, AWS_SECRET_ACCESS_KEY=gw.secret_key,
                      AWS_ENDPOINT_URL=gw.endpoint, AWS_EC2_METADATA_DISABLED="true")
        url = "s3://%s/%s" % (bucket, S3_PREFIX)

        def reset():
            keys = sorted(s3_keys(client, S3_PREFIX))
            if keys:
                client.delete_many(keys)

        def holds():
            keys = s3_keys(client, S3_PREFIX)
            stored = sum(n for k, n in keys.items() if k.startswith(S3_PREFIX + "blobs/"))
            return "bucket holds %.1f MiB in %d objects, blobs %.1f MiB (%s)" % (
                sum(keys.values()) / MiB, len(keys), stored / MiB,
                "= the floor object" if stored == size else "the floor object: %.1f MiB" % (size / MiB))

        def also(wall, daemons_cpu):
            return "%.1f MB/s of the stored bytes; S3 daemons CPU %.2f s" % (size / wall / MB, daemons_cpu)

        s3push = add(named("dogestry push s3:// (gzip, empty prefix)",
                           best_of(args.repeat, lambda: measure_dogestry(
                               "push", url, TAG, run_env=s3_env, reset=reset, holds=holds, also=also))))
        s3repush = add(named("dogestry re-push s3:// (unchanged image)",
                             best_of(args.repeat, lambda: measure_dogestry(
                                 "push", url, TAG, run_env=s3_env, fresh=False, moves_image=False))))
        s3pull = add(named("dogestry pull s3:// (after rmi)",
                           best_of(args.repeat, lambda: measure_dogestry(
                               "pull", url, TAG, pull=True, run_env=s3_env, also=also))))
        put_name = "S3 PUT floor (%s)" % ("1 request" if s3_put is put1 else "%d conns" % S3_STREAMS)
        get_name = "S3 GET floor (%s)" % ("1 request" if s3_get is get1 else "%d conns" % S3_STREAMS)
        push_floor_s3 = max((("save", save.seconds), ("gzip", gzip_floor.seconds),
                             ("S3 PUT", s3_put.seconds)), key=lambda f: f[1])
        pull_floor_s3 = max((("load", load.seconds), ("S3 GET", s3_get.seconds)), key=lambda f: f[1])
        floors[s3push.stage] = push_floor_s3
        floors[s3pull.stage] = pull_floor_s3
        s3_fleet_checks = []
        if fleet:
            s3_layers = stored_layers(client.get(S3_PREFIX + "images/%s/manifest.json" % img[7:]).read())
            meter = RgwMeter(gw)
            one = add(named("fleet pull s3://, 1 host", best_of(args.repeat, lambda: measure_fleet(
                url, fleet[:1], s3_layers, run_env=s3_env, meter=meter, bucket=bucket))))
            three = add(named("fleet pull s3://, 3 hosts", best_of(args.repeat, lambda: measure_fleet(
                url, fleet, s3_layers, run_env=s3_env, meter=meter, bucket=bucket))))
            floors[one.stage] = floors[three.stage] = max(
                (("TCP load", tcp_load.seconds), ("S3 GET", s3_get.seconds)), key=lambda f: f[1])
            s3_fleet_checks = check_fleet("fleet, S3 store", one, three, s3_layers)
        return [
            (s3push.seconds <= TARGET_PUSH_BOUND_RATIO * max(push_bound, s3_put.seconds),
             "S3 push %.2f s <= %.2f x the slower of (the push bound %.2f s, %s %.2f s) = %.2f s  [%.2fx; %.2fx"
             " the slowest of save %.2f s, gzip floor %.2f s and the PUT]"
             % (s3push.seconds, TARGET_PUSH_BOUND_RATIO, push_bound, put_name, s3_put.seconds,
                TARGET_PUSH_BOUND_RATIO * max(push_bound, s3_put.seconds),
                s3push.seconds / max(push_bound, s3_put.seconds), s3push.seconds / push_floor_s3[1],
                save.seconds, gzip_floor.seconds)),
            (s3pull.seconds <= TARGET_PULL_RATIO * pull_floor_s3[1],
             "S3 pull %.2f s <= %.1f x slower of (docker load %.2f s, %s %.2f s) = %.2f s  [%.2fx]"
             % (s3pull.seconds, TARGET_PULL_RATIO, load.seconds, get_name, s3_get.seconds,
                TARGET_PULL_RATIO * pull_floor_s3[1], s3pull.seconds / pull_floor_s3[1])),
            (s3push.rss_kib / 1024 <= TARGET_RSS_MIB,
             "S3 push peak RSS %.1f MiB <= %d MiB" % (s3push.rss_kib / 1024, TARGET_RSS_MIB)),
            (s3pull.rss_kib / 1024 <= TARGET_RSS_MIB,
             "S3 pull peak RSS %.1f MiB <= %d MiB" % (s3pull.rss_kib / 1024, TARGET_RSS_MIB)),
            (s3repush.seconds < TARGET_REPUSH_S,
             "S3 re-push %.2f s < %.1f s" % (s3repush.seconds, TARGET_REPUSH_S)),
        ] + s3_fleet_checks + run_copy(gw, s3_env, url, client, dogestry, putm, size, bucket, s3pull) + (
            run_registry(gw, s3_env, url, client, dogestry) if args.registry else []) + (
            run_registry_push(gw, s3_env, dogestry) if args.registry else []) + (
            run_gc(gw, s3_env, dogestry) if args.gc else [])

    def run_copy(gw, s3_env, url, client, dogestry, put_floor, obj_size, bucket, s3pull):
        """dogestry copy of the image from the gzip directory store to an empty prefix of the bucket
        (streamed), against the multipart PUT floor of the same bytes; then from the S3 store to an
        empty prefix of another bucket on the same radosgw (server-side): the seconds, and the bytes
        that went through the machine from radosgw's access log and counters.  Every copy is checked
        (the output line, tag, config, manifest, blobs); each destination is pulled once after rmi."""
        meter = RgwMeter(gw)
        up_prefix = "bench-copy/"
        up_url = "s3://%s/%s" % (bucket, up_prefix)
        dst_bucket = "dgbenchcp-%d-%s" % (os.getpid(), os.urandom(4).hex())
        dst_client = s3_client(dogestry, gw, dst_bucket)
        make_bucket(dst_client)
        dst_prefix = "copy/"
        dst_url = "s3://%s/%s" % (dst_bucket, dst_prefix)
        results.append("-- copy: gzip dir store -> %s (streamed); %s -> %s (same radosgw: server-side)"
                       % (up_url, url, dst_url))

        def listing_of(c, prefix):
            return {k[len(prefix):]: n for k, n in s3_keys(c, prefix).items() if k[len(prefix):].startswith(STORE_DIRS)}

        def measure_copy(src, c, prefix, dst, reference, what, moves_image):
            keys = sorted(s3_keys(c, prefix))
            if keys:
                c.delete_many(keys)
            if s3_keys(c, prefix):
                raise BenchError("%s is not empty after deleting its keys" % dst)
            mark = meter.mark()
            result = measure_dogestry("copy", src, dst, TAG, run_env=s3_env, fresh=False, moves_image=moves_image,
                                      also=lambda wall, daemons: "S3 daemons CPU %.2f s" % daemons)
            result.traffic = traffic = meter.traffic(mark)
            output_has(result.lines, "Copied %s (%s)" % (TAG, img))
            listing = listing_of(c, prefix)
            check_stored(dst, listing, lambda key: c.get(prefix + key).read(), img, TAG, diff_ids)
            result.note = "; ".join(n for n in (
                result.note, "tag, config, manifest and blobs checked; " + compare_listings(listing, reference, what),
            ) if n) + ";\n  " + traffic.describe()
            return result

        up = add(named("dogestry copy dir -> s3:// (empty prefix)", best_of(args.repeat, lambda: measure_copy(
            store_gz, client, up_prefix, up_url, gz_listing, "the gzip dir store", True))))
        up.note += ";\n  radosgw received %.1f MB of PUT bodies; the gzip store's blobs are %.1f MB" % (
            up.traffic.put_bytes / MB, obj_size / MB)
        floors[up.stage] = ("S3 PUT %d conns" % S3_STREAMS, put_floor.seconds)
        up_pull = add(named("  (pull from that copy, after rmi)", measure_dogestry(
            "pull", up_url, TAG, pull=True, run_env=s3_env)))
        floors[up_pull.stage] = ("S3 pull", s3pull.seconds)

        def measure_copy_floor():
            s0, t0 = s3cpu.now(), time.perf_counter()
            dst_client.copy_object(bucket, "floor/single", "floor/copied", obj_size)
            wall = time.perf_counter() - t0
            if dst_client.head_size("floor/copied") != obj_size:
                raise BenchError("CopyObject of the floor object: the copy is not %d B" % obj_size)
            return Result("", wall, None, note="the %.1f MB floor object to the other bucket; S3 daemons CPU %.2f s"
                          % (obj_size / MB, s3cpu.since(s0)))

        copy_floor = add(named("  (S3 CopyObject, 1 request)", best_of(args.repeat, measure_copy_floor)))
        s3_listing = listing_of(client, S3_PREFIX)
        across = add(named("dogestry copy s3:// -> s3:// (other bucket)", best_of(args.repeat, lambda: measure_copy(
            url, dst_client, dst_prefix, dst_url, s3_listing, "the S3 store", False))))
        server_side = sum(1 for _, line in across.lines if re.match(r"[0-9a-f]{12}: copied \(server-side\)", line))
        across.note += ";\n  dogestry's progress: %d blob(s) 'copied (server-side)'" % server_side
        floors[across.stage] = ("CopyObject", copy_floor.seconds)
        across_pull = add(named("  (pull from that copy, after rmi)", measure_dogestry(
            "pull", dst_url, TAG, pull=True, run_env=s3_env)))
        floors[across_pull.stage] = ("S3 pull", s3pull.seconds)
        through = across.traffic.through
        return [
            (up.seconds <= TARGET_COPY_PUT_RATIO * put_floor.seconds,
             "copy dir -> S3 %.2f s <= %.1f x the S3 PUT floor (%d MiB parts, %d conns) %.2f s = %.2f s  [%.2fx]"
             % (up.seconds, TARGET_COPY_PUT_RATIO, S3_PART // MiB, S3_STREAMS, put_floor.seconds,
                TARGET_COPY_PUT_RATIO * put_floor.seconds, up.seconds / put_floor.seconds)),
            (through < TARGET_COPY_THROUGH_SHARE * tar_bytes,
             "copy S3 -> S3 on one radosgw (%.2f s): %s B through the machine (GET answers %s B, PUT/POST %s B;"
             " blob keys %s B) < %.0f%% of the image %s B  [%.3f%%]"
             % (across.seconds, "{:,}".format(through), "{:,}".format(across.traffic.get_bytes),
                "{:,}".format(across.traffic.put_bytes), "{:,}".format(across.traffic.blob_bytes),
                100 * TARGET_COPY_THROUGH_SHARE, "{:,}".format(tar_bytes), 100.0 * through / tar_bytes)),
        ]

    def run_gc(gw, s3_env, dogestry):
        """dogestry gc of a store of GC_TAGS tags and GC_TAGS * GC_LAYERS small blobs on radosgw, half
        of it untagged long enough ago: the seconds it takes and the requests it sends (radosgw's
        access log, checked against its request counter)."""
        bucket = "dgbenchgc-%d-%s" % (os.getpid(), os.urandom(4).hex())
        client = s3_client(dogestry, gw, bucket)
        make_bucket(client)
        store = dogestry.S3Store(dogestry.S3Location(bucket, "gc/", "us-east-1", gw.endpoint), client, 4)
        log("gc: writing %d tags, %d images and %d small blobs with their index entries (not timed)"
            % (GC_TAGS, GC_TAGS, GC_TAGS * GC_LAYERS))
        t = time.perf_counter()

        def write_image(n):
            records = []
            for layer in range(GC_LAYERS):
                data = b"image %d layer %d " % (n, layer) + os.urandom(64)
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                store.put_bytes(dogestry.blob_key(digest), data)
                record = dogestry.LayerRecord(digest, digest, len(data), "none", len(data))
                dogestry.write_json(store, dogestry.layer_index_key(digest), record.to_json())
                records.append(record)
            config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [r.diff_id for r in records]},
                                 "n": n}).encode()
            image_id = "sha256:" + hashlib.sha256(config).hexdigest()
            dogestry._write_image(store, image_id, config, records)
            ref = dogestry.ImageRef("bench/app%d" % (n % 50), "v%d" % n)
            store.put_bytes(dogestry.tag_key(ref), image_id[7:].encode())
            return ref, image_id[7:]

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            tags = list(pool.map(write_image, range(GC_TAGS)))
        doomed = tags[::2]
        dogestry.remove_tags(store, doomed)
        log("gc: store written in %.1f s; waiting until it is %d s old on radosgw's clock"
            % (time.perf_counter() - t, GC_GRACE + 1))
        while client.age("gc/" + dogestry.UNTAGGED_PREFIX + doomed[-1][1]) < GC_GRACE + 1:
            time.sleep(0.5)
        env = dict(s3_env, DOGESTRY_GC_MIN_GRACE=str(GC_GRACE))
        meter = RgwMeter(gw)
        mark = meter.mark()
        run = timed_process(dogestry_cmd(workdir, "gc", "--grace", "%ds" % GC_GRACE, "s3://%s/gc/" % bucket), env)
        counts = collections.Counter(method for method, _, _, _ in meter.logged(mark))
        summary = [text for _, text in run.lines if text.startswith("gc s3://")]
        log("gc: %.1f s: %s" % (run.wall, "; ".join(summary)))
        deleted = len(doomed) * (2 + 2 * GC_LAYERS) + len(doomed)  # image keys, index entries, blobs; untagged records
        left = sum(1 for _ in client.list("gc/"))
        expected_left = (GC_TAGS - len(doomed)) * (3 + 2 * GC_LAYERS)
        requests = sum(counts.values())
        result = Result("dogestry gc s3:// (%d tags, %d blobs)" % (GC_TAGS, GC_TAGS * GC_LAYERS), run.wall, None,
                        run.rss_kib, run.cpu, None, run.lines)
        result.note = "deleted %d objects (%d left, %d expected); %d requests: %s; %.2f requests per deleted object" % (
            deleted, left, expected_left, requests, ", ".join("%s %d" % kv for kv in sorted(counts.items())),
            requests / deleted)
        add(result)
        if left != expected_left:
            raise BenchError("gc left %d objects, not %d: %s" % (left, expected_left, summary))
        return [
            (run.wall < TARGET_GC_S, "gc of %d tags / %d blobs %.1f s < %d s" % (GC_TAGS, GC_TAGS * GC_LAYERS,
                                                                               run.wall, TARGET_GC_S)),
            (requests < TARGET_GC_REQUESTS * deleted,
             "gc sent %d requests for %d deleted objects: %.2f < %d a deleted object"
             % (requests, deleted, requests / deleted, TARGET_GC_REQUESTS)),
        ]

    def run_registry_push(gw, s3_env, dogestry):
        """docker push of the image into `dogestry -server STORE` on radosgw, in turns with docker push
        into Debian's docker-registry with its filesystem driver on the work disk (the floor: docker's
        own gzip and upload into a registry that does nothing slow) and with its S3 driver on the
        same radosgw (the peer); each push into an empty registry.  Then SERVER_PUSHES pushes at once
        into the server: its peak RSS, and its CPU seconds per GiB pushed."""
        registry_bin = shutil.which("docker-registry")
        if registry_bin is None:
            return []
        bucket = "dgbenchpush-%d-%s" % (os.getpid(), os.urandom(4).hex())
        push_client = s3_client(dogestry, gw, bucket)
        make_bucket(push_client)
        fs_addr, s3_addr, dog_addr = loopback_addresses(3, ports=(SERVER_PORT, REGISTRY_PORT))
        reg_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # AWS_CA_BUNDLE panics it
        rounds = itertools.count()

        def serve(cmd, run_env, address, port, name):
            with open(str(workdir / ("%s.log" % name)), "ab") as out:
                proc = subprocess.Popen(cmd, env=run_env, stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while not registry_answers(address, port):
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise BenchError("%s on %s:%d did not start (see %s)" % (name, address, port, workdir))
                time.sleep(0.05)
            return proc

        def docker_registry(address, storage):
            config = workdir / ("push-registry-%s.yml" % address)
            config.write_text("version: 0.1\nlog:\n  level: error\nstorage:\n%s  cache:\n    blobdescriptor: inmemory\n"
                              "http:\n  addr: %s:%d\n  secret: bench\n" % (storage, address, REGISTRY_PORT))
            return serve([registry_bin, "serve", str(config)], reg_env, address, REGISTRY_PORT, "docker-registry-push")

        def push_into(start, address, port, ref_name, stored):
            """docker push into a registry START() runs (empty), timed; STORED() checks what it holds."""
            proc = start()
            ref = "%s:%d/%s" % (address, port, ref_name)
            try:
                docker_cli(host, "tag", TAG, ref)
                e0 = engine.now()
                run = timed_process([docker, "-H", host, "push", ref], env)
                result = Result("", run.wall, tar_bytes, engine_cpu=engine.since(e0))
                result.note = stored(ref)
                result.server_pid = proc.pid
                return result
            finally:
                docker_cli(host, "rmi", ref)
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)

        def digest_served(ref):
            repo = ref.rsplit(":", 1)[0]
            digests = [d.rsplit("@", 1)[1] for d in json.loads(docker_cli(host, "image", "inspect", "-f",
                                                                          "{{json .RepoDigests}}", ref).stdout)
                       if d.startswith(repo + "@")]
            if not digests:
                raise BenchError("docker push %s recorded no digest" % ref)
            return "pushed as %s" % digests[0][:19]

        def floor_round():
            n = next(rounds)
            return push_into(lambda: docker_registry(fs_addr, "  filesystem:\n    rootdirectory: %s\n"
                                                     % (workdir / ("registry-fs-%d" % n))),
                             fs_addr, REGISTRY_PORT, "bench/image:%d" % n, digest_served)

        def peer_round():
            n = next(rounds)
            return push_into(lambda: docker_registry(s3_addr, (
                "  s3:\n    accesskey: %s\n    secretkey: %s\n    region: us-east-1\n    regionendpoint: %s\n"
                "    bucket: %s\n    secure: false\n    v4auth: true\n    rootdirectory: /registry-%d\n")
                % (gw.access_key, gw.secret_key, gw.endpoint, bucket, n)),
                s3_addr, REGISTRY_PORT, "bench/image:%d" % n, digest_served)

        def dogestry_round():
            n = next(rounds)
            store = "s3://%s/push-%d/" % (bucket, n)

            def stored(ref):
                tag = push_client.call("GET", "push-%d/repositories/bench/image/%d" % (n, n))[1].decode().strip()
                if tag != img[7:]:
                    raise BenchError("docker push into dogestry -server stored image %s, not %s" % (tag, img))
                return digest_served(ref) + "; the store's tag names the image"

            return push_into(lambda: serve(dogestry_cmd(workdir, "-server", "-anonymous-push", "-address", dog_addr,
                                                        "-port", str(SERVER_PORT), store),
                                           s3_env, dog_addr, SERVER_PORT, "dogestry-server-push"),
                             dog_addr, SERVER_PORT, "bench/image:%d" % n, stored)

        results.append("-- registry API: docker push into dogestry -server (radosgw), docker-registry 2.8 on local"
                       " disk (the floor) and docker-registry with its S3 driver on the same radosgw (the peer)")
        floor, peer, dog = best_of_interleaved(args.repeat, floor_round, peer_round, dogestry_round)
        floor = add(named("floor: docker push into docker-registry (filesystem)", floor))
        peer = add(named("docker push into docker-registry (S3 driver)", peer))
        dog = add(named("docker push into dogestry -server (S3)", dog))
        floors[dog.stage] = ("registry fs", floor.seconds)
        floors[peer.stage] = ("registry fs", floor.seconds)

        # SERVER_PUSHES pushes at once (to repositories of their own): the server's peak RSS and CPU
        n = next(rounds)
        proc = serve(dogestry_cmd(workdir, "-server", "-anonymous-push", "-address", dog_addr, "-port",
                                  str(SERVER_PORT), "s3://%s/push-%d/" % (bucket, n)),
                     s3_env, dog_addr, SERVER_PORT, "dogestry-server-push")
        refs = ["%s:%d/bench%d/image:%d" % (dog_addr, SERVER_PORT, i, n) for i in range(SERVER_PUSHES)]
        try:
            for ref in refs:
                docker_cli(host, "tag", TAG, ref)
            cpu0 = process_cpu(proc.pid)
            t = time.perf_counter()
            pushes = [subprocess.Popen([docker, "-H", host, "push", ref], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE) for ref in refs]
            failed = [p.stderr.read().decode() for p in pushes if p.wait() != 0]
            wall = time.perf_counter() - t
            cpu, peak = process_cpu(proc.pid) - cpu0, vm_hwm_kib(proc.pid)
            if failed:
                raise BenchError("docker push into dogestry -server failed: %s" % failed[0])
            pushed_bytes = SERVER_PUSHES * sum(manifest_layer_sizes(dog_addr, SERVER_PORT, refs[0].split("/", 1)[1]))
        finally:
            for ref in refs:
                docker_cli(host, "rmi", ref, check=False)
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        together = add(Result("%d docker pushes at once into dogestry -server (S3)" % SERVER_PUSHES, wall,
                              SERVER_PUSHES * tar_bytes, peak, cpu))
        together.note = "server: peak RSS %.1f MiB, %.2f CPU s for %.1f MB of blobs: %.2f CPU s per GiB" % (
            peak / 1024.0, cpu, pushed_bytes / MB, cpu / (pushed_bytes / float(1 << 30)))
        return [
            (dog.seconds <= TARGET_REGISTRY_PUSH_RATIO * floor.seconds,
             "docker push into dogestry -server %.2f s <= %.1f x into docker-registry on local disk %.2f s  [%.2fx;"
             " %.2fx docker-registry's S3 driver %.2f s]"
             % (dog.seconds, TARGET_REGISTRY_PUSH_RATIO, floor.seconds, dog.seconds / floor.seconds,
                dog.seconds / peer.seconds, peer.seconds)),
            (peak / 1024.0 <= TARGET_SERVER_PUSH_RSS_MIB,
             "dogestry -server peak RSS with %d pushes at once %.1f MiB <= %d MiB"
             % (SERVER_PUSHES, peak / 1024.0, TARGET_SERVER_PUSH_RSS_MIB)),
        ]

    def run_registry(gw, s3_env, url, client, dogestry):
        """docker pull (and ctr pull) of the image through `dogestry -server STORE` (S3 stores, blobs
        by presigned redirect), against Debian's docker-registry with its S3 driver on the same
        radosgw, in this run; and how many bytes the dogestry server itself sent.

        docker push compresses at gzip level 6, dogestry push by default at level 1 (for push
        speed): the target compares blobs of equal compression (a store pushed with
        --compress-level 6); the default store is served and measured too, for the record."""
        registry_bin = shutil.which("docker-registry")
        if registry_bin is None:
            image["registry"] = ["registry: skipped, docker-registry is not installed (apt-get install docker-registry)"]
            return []
        url6 = "s3://%s/%s" % (url[len("s3://"):].split("/")[0], REGISTRY_PREFIX)
        push6 = add(named("dogestry push s3:// --compress-level %d" % REGISTRY_LEVEL, best_of(1, lambda: (
            measure_dogestry("push", "--compress-level", REGISTRY_LEVEL, url6, TAG, run_env=s3_env)))))
        push6.note = "the store the registry target is measured on (docker push compresses at level %d too)" \
            % REGISTRY_LEVEL
        dog6_addr, dog_addr, ref_addr = loopback_addresses(3, ports=(SERVER_PORT, REGISTRY_PORT))
        servers = [("dogestry -server (level %d)" % REGISTRY_LEVEL, url6, dog6_addr),
                   ("dogestry -server (default level %d)" % dogestry.GZIP_LEVEL, url, dog_addr)]
        dog_refs = ["%s:%d/%s" % (address, SERVER_PORT, TAG) for _, _, address in servers]
        ref_ref = "%s:%d/%s" % (ref_addr, REGISTRY_PORT, TAG)
        procs = []
        try:
            for (_, store_url, address) in servers:
                with open(str(workdir / ("dogestry-server-%s.log" % address)), "wb") as out:
                    procs.append(subprocess.Popen(dogestry_cmd(workdir, "-server", "-address", address, "-port",
                                                               str(SERVER_PORT), store_url),
                                                  env=s3_env, stdout=out, stderr=subprocess.STDOUT))
            reg_bucket = "dgbenchreg-%d-%s" % (os.getpid(), os.urandom(4).hex())
            make_bucket(s3_client(dogestry, gw, reg_bucket))
            config = workdir / "registry.yml"
            config.write_text(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  s3:\n    accesskey: %s\n    secretkey: %s\n"
                "    region: us-east-1\n    regionendpoint: %s\n    bucket: %s\n    secure: false\n"
                "    v4auth: true\n    rootdirectory: /registry\n  cache:\n    blobdescriptor: inmemory\n"
                "http:\n  addr: %s:%d\n  secret: bench\n"
                % (gw.access_key, gw.secret_key, gw.endpoint, reg_bucket, ref_addr, REGISTRY_PORT))
            reg_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # AWS_CA_BUNDLE panics it
            with open(str(workdir / "docker-registry.log"), "wb") as out:
                procs.append(subprocess.Popen([registry_bin, "serve", str(config)], env=reg_env, stdout=out,
                                              stderr=subprocess.STDOUT))
            listeners = [(address, SERVER_PORT) for _, _, address in servers] + [(ref_addr, REGISTRY_PORT)]
            for address, port in listeners:
                deadline = time.monotonic() + 30
                while not registry_answers(address, port):
                    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                        raise BenchError("the registry on %s:%d did not start (see %s)" % (address, port, workdir))
                    time.sleep(0.1)
            log("pushing %s to docker-registry (docker push; not timed)" % TAG)
            t = time.perf_counter()
            docker_cli(host, "tag", TAG, ref_ref)
            docker_cli(host, "push", ref_ref)
            log("docker push to docker-registry took %.1f s" % (time.perf_counter() - t))

            def forget_all():
                for r in [ref_ref] + dog_refs:
                    if image_id(host, r) is not None:
                        docker_cli(host, "rmi", "-f", r)
                remove_image(host, TAG, diff_ids, handle, missing_ok=True)

            def docker_pull(ref, server=None):
                forget_all()
                e0, io0 = engine.now(), wchar(server.pid) if server else None
                run = timed_process([docker, "-H", host, "pull", ref], env)
                result = Result("", run.wall, tar_bytes, None, None, engine.since(e0))
                if image_id(host, ref) != img:
                    raise BenchError("docker pull %s gave image %s, not %s" % (ref, image_id(host, ref), img))
                sent = wchar(server.pid) - io0 if server else None
                result.note = "image ID after pull: the same" + (
                    "; the server itself sent %.2f MB (%.2f%% of the image)" % (sent / MB, 100.0 * sent / tar_bytes)
                    if server else "")
                result.sent = sent
                return result

            results.append("-- registry API: docker pull through dogestry -server (S3, presigned redirects) and"
                           " through docker-registry 2.8 (S3 driver) on the same radosgw")
            for name, store_url, address in servers:
                results.append("   %s %s serves the layers as %s" % (name, store_url, served_layers(
                    address, SERVER_PORT, TAG)))
            results.append("   docker-registry serves the layers as %s" % served_layers(ref_addr, REGISTRY_PORT, TAG))
            dogs = [add(named("docker pull via %s" % name, best_of(args.repeat, lambda: docker_pull(dog_ref, proc))))
                    for (name, _, _), dog_ref, proc in zip(servers, dog_refs, procs)]
            ref = add(named("docker pull via docker-registry", best_of(args.repeat, lambda: docker_pull(ref_ref))))
            for dog in dogs:
                floors[dog.stage] = ("docker-registry", ref.seconds)
            if handle is not None:
                sock = str(handle.exec_root / "containerd" / "containerd.sock")
                for name, target in [(name, r) for (name, _, _), r in zip(servers, dog_refs)] + [
                        ("docker-registry", ref_ref)]:
                    add(named("ctr pull via %s" % name, best_of(args.repeat, lambda: ctr_pull(sock, target))))
            forget_all()
            docker_cli(host, "pull", dog_refs[0])  # the image back under its own tag, for what follows
            docker_cli(host, "tag", dog_refs[0], TAG)
            docker_cli(host, "rmi", dog_refs[0])
            dog, default = dogs
            return [
                (dog.seconds <= TARGET_REGISTRY_RATIO * ref.seconds,
                 "docker pull via dogestry %.2f s <= %.1f x via docker-registry %.2f s  [%.2fx]  (both gzip -%d;"
                 " the default level-%d store: %.2f s, %.2fx)"
                 % (dog.seconds, TARGET_REGISTRY_RATIO, ref.seconds, dog.seconds / ref.seconds, REGISTRY_LEVEL,
                    dogestry.GZIP_LEVEL, default.seconds, default.seconds / ref.seconds)),
                (max(dog.sent, default.sent) < TARGET_REDIRECT_SHARE * tar_bytes,
                 "the dogestry servers sent %.2f MB at most < %.0f%% of the image (blobs come from S3 by redirect)"
                 % (max(dog.sent, default.sent) / MB, 100 * TARGET_REDIRECT_SHARE)),
            ]
        finally:
            for proc in procs:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)

    s3_checks = []
    if args.s3:
        s3_checks = run_s3()
    stop_fleet(state, args.keep)
    chunks = None
    if args.chunks:
        chunks = run_chunks(args, state, workdir, host, handle)
        results.append("-- chunks: sub-layer dedup, scenarios A-D (bytes and objects: the table after this one)")
        results.extend(chunks.rows)

    checks = [
        (push.seconds <= TARGET_PUSH_BOUND_RATIO * push_bound,
         "push %.2f s <= %.2f x the least any push takes here %.2f s = %.2f s  [%.2fx; %.2fx the slowest of"
         " save %.2f s and gzip floor %.2f s]"
         % (push.seconds, TARGET_PUSH_BOUND_RATIO, push_bound, TARGET_PUSH_BOUND_RATIO * push_bound,
            push.seconds / push_bound, push.seconds / push_floor[1], save.seconds, gzip_floor.seconds)
         + "\n        (the bound: the engine's first byte at %.2f s, then CPU s on %d cores: %.2f gzip of the"
           " layers that compress + %.2f engine streaming + %.2f sha256)"
         % (save.first_byte, workers, compressible.cpu, save.stream_cpu or 0.0, sha_cpu)),
        (raw.seconds <= TARGET_RAW_PUSH_RATIO * save.seconds,
         "push --compress none %.2f s <= %.2f x docker save %.2f s = %.2f s  [%.2fx]"
         % (raw.seconds, TARGET_RAW_PUSH_RATIO, save.seconds, TARGET_RAW_PUSH_RATIO * save.seconds,
            raw.seconds / save.seconds)),
        (pull.seconds <= TARGET_PULL_RATIO * load.seconds,
         "pull %.2f s <= %.1f x docker load %.2f s = %.2f s  [%.2fx]"
         % (pull.seconds, TARGET_PULL_RATIO, load.seconds, TARGET_PULL_RATIO * load.seconds,
            pull.seconds / load.seconds)),
        (push.rss_kib / 1024 <= TARGET_RSS_MIB,
         "push peak RSS %.1f MiB <= %d MiB" % (push.rss_kib / 1024, TARGET_RSS_MIB)),
        (pull.rss_kib / 1024 <= TARGET_RSS_MIB,
         "pull peak RSS %.1f MiB <= %d MiB" % (pull.rss_kib / 1024, TARGET_RSS_MIB)),
        (repush.seconds < TARGET_REPUSH_S,
         "re-push %.2f s < %.1f s" % (repush.seconds, TARGET_REPUSH_S)),
        (imported.seconds <= TARGET_IMPORT_RATIO * push.seconds,
         "import of the saved tar %.2f s <= %.1f x push %.2f s = %.2f s  [%.2fx]"
         % (imported.seconds, TARGET_IMPORT_RATIO, push.seconds, TARGET_IMPORT_RATIO * push.seconds,
            imported.seconds / push.seconds)),
        (exported.seconds <= TARGET_EXPORT_RATIO * save_file.seconds,
         "export -o FILE %.2f s <= %.1f x docker save > file %.2f s = %.2f s  [%.2fx; --format oci %.2f s, %.2fx]"
         % (exported.seconds, TARGET_EXPORT_RATIO, save_file.seconds, TARGET_EXPORT_RATIO * save_file.seconds,
            exported.seconds / save_file.seconds, exported_oci.seconds, exported_oci.seconds / save_file.seconds)),
    ] + fleet_checks + s3_checks + (chunks.checks if chunks else []) + startup_checks
    print_report(facts, image, results, floors, checks, chunks)


def cleanup(state, keep):
    """Stop the fleet and radosgw, remove the image (external engine), stop our dockerd, remove the work dir."""
    host, handle, workdir = state.get("host"), state.get("dockerd"), state.get("workdir")
    stop_fleet(state, keep)
    if state.get("rgw") is not None:
        log("stopping radosgw")
        state["rgw"].stop(keep_workdir=keep)
    if host and handle is None and state.get("image_built"):
        docker_cli(host, "rmi", "-f", TAG, check=False)
    if host and handle is None and state.get("chunk_tags"):
        docker_cli(host, "rmi", "-f", *state["chunk_tags"], check=False)
    if handle is not None:
        log("stopping dockerd")
        handle.stop(remove_data=not keep)
    if workdir:
        if keep:
            log("kept %s" % workdir)
        else:
            remove_tree(workdir)
            log("removed %s" % workdir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512, help="image size in MiB (default 512)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (stores, saved tar)")
    parser.add_argument("--workdir", help="where to make the work directory (default $TMPDIR or /tmp)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every stage N times and report the best (default 1)")
    s3 = parser.add_mutually_exclusive_group()
    s3.add_argument("--s3", dest="s3", action="store_true", default=None,
                    help="also benchmark an S3 store on a throw-away radosgw (default: when radosgw is installed)")
    s3.add_argument("--no-s3", dest="s3", action="store_false", help="skip the S3 store")
    fleet = parser.add_mutually_exclusive_group()
    fleet.add_argument("--fleet", dest="fleet", action="store_true", default=True,
                       help="also benchmark dogestry -pullhosts to 1 and 3 extra dockerds on random loopback addresses"
                       " (the default)")
    fleet.add_argument("--no-fleet", dest="fleet", action="store_false", help="skip the fleet")
    parser.add_argument("--no-registry", dest="registry", action="store_false", default=True,
                        help="with S3: skip docker pull through dogestry -server and docker-registry")
    parser.add_argument("--no-multiplatform", dest="multiplatform", action="store_false", default=True,
                        help="with the fleet: skip the two-platform import and -pullhosts (needs buildah)")
    parser.add_argument("--no-gc", dest="gc", action="store_false", default=True,
                        help="with S3: skip gc of a store of 2,000 tags and 20,000 small blobs")
    parser.add_argument("--startup-runs", type=int, default=STARTUP_RUNS,
                        help="runs of each command in the start-up stage (default %d)" % STARTUP_RUNS)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--startup-only", action="store_true",
                      help="only the start-up stage (needs no Docker engine)")
    only.add_argument("--no-chunks", dest="chunks", action="store_false", default=True,
                      help="skip the sub-layer dedup stage (scenarios A-D of chunked layers)")
    only.add_argument("--chunks-only", action="store_true",
                      help="only the sub-layer dedup stage (no start-up stage, no bench image)")
    parser.add_argument("--chunk-size-mib", type=int, default=CHUNK_SIZE_MIB,
                        help="the sub-layer dedup stage's tree layer in MiB; C's file is 500/1024 of it"
                        " (default %d)" % CHUNK_SIZE_MIB)
    parser.add_argument("--chunks-s3", action="store_true",
                        help="the sub-layer dedup stage also pushes to radosgw and counts the requests")
    args = parser.parse_args(argv)
    args.s3_auto = args.s3 is None
    if args.s3 is None:
        args.s3 = radosgw_installed()
    elif args.s3 and not radosgw_installed():
        parser.error("--s3 needs radosgw, ceph-mon, ceph-osd, ceph and radosgw-admin on PATH")
    if args.size_mib < 3:
        parser.error("--size-mib must be at least 3")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.startup_runs < 1:
        parser.error("--startup-runs must be at least 1")
    if args.chunk_size_mib < 32:
        parser.error("--chunk-size-mib must be at least 32 (layers under 16 MiB are not chunked)")
    if args.chunks_s3 and not radosgw_installed():
        parser.error("--chunks-s3 needs radosgw, ceph-mon, ceph-osd, ceph and radosgw-admin on PATH")

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    state, status = {}, 0
    try:
        run(args, state)
    except KeyboardInterrupt:
        print("\n[bench] interrupted; cleaning up", flush=True)
        status = 130
    except Exception as e:  # noqa: BLE001 - a report script: say what failed, clean up, exit 1
        print("\n[bench] FAILED: %s: %s" % (type(e).__name__, e), flush=True)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanup(state, args.keep)
    log("total %.1f s" % (time.monotonic() - T0))
    return status


if __name__ == "__main__":
    sys.exit(main())
