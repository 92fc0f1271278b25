#!/usr/bin/env python3
"""Benchmark dogestry push/pull against the floors measured in the same run (a script, not a test).

    python3 tests/bench.py [--size-mib 512] [--keep] [--workdir DIR]

Starts its own dockerd (unless DOCKER_HOST is set) in a temp dir on the same disk as the
stores, builds a FROM-scratch image of three roughly equal layers (random, text, mixed),
and measures:

  floors    docker save > /dev/null, docker load of the saved tar (after docker rmi),
            gzip -1 of the saved tar single-threaded and on all cores in 4 MiB members
  dogestry  push to an empty store, re-push, push --compress none, pull (after docker rmi)

then prints a table (seconds, MB/s of the image, peak RSS, CPU) and the targets with
PASS/FAIL.  Exits 0 whether the targets pass or not; 1 if something failed to run; 130 on
Ctrl-C.  Everything it started or created is removed at the end (--keep keeps the work
directory: stores, saved tar, logs).  MB = 10^6 bytes, MiB = 2^20 bytes.
"""

import argparse
import concurrent.futures
import collections
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdocker import (  # noqa: E402
    DOGESTRY, FIXED_MTIME, client_env, docker_cli, find_docker, random_bytes, remove_tree,
    start_dockerd, text_bytes,
)

MiB = 1 << 20
MB = 1000 * 1000
GEN_CHUNK = 4 * MiB       # data is generated and written this much at a time
FILE_SIZE = 32 * MiB      # each layer is split into files of at most this size
GZ_CHUNK = 4 * MiB        # dogestry's CHUNK_GZ: independent gzip members of this size
TAG = "dogestry-bench/image:%d" % os.getpid()

TARGET_PUSH_RATIO = 1.2
TARGET_PULL_RATIO = 1.2
TARGET_RSS_MIB = 80
TARGET_REPUSH_S = 1.0


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


def image_id(host, ref):
    """The engine's ID for REF, or None."""
    proc = docker_cli(host, "image", "inspect", "-f", "{{.Id}}", ref, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


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


def remove_image(host, ref, diff_ids, handle):
    """docker rmi REF and make sure the engine really dropped its layers."""
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

    def __init__(self, stage, seconds, nbytes=None, rss_kib=None, cpu=None, lines=(), note=""):
        self.stage, self.seconds, self.nbytes = stage, seconds, nbytes
        self.rss_kib, self.cpu, self.lines, self.note = rss_kib, cpu, list(lines), note

    @property
    def mbps(self):
        return self.nbytes / self.seconds / MB if self.nbytes and self.seconds > 0 else None


def timed_cli(host, *args, stdout=None, stdin=None, timeout=600):
    """Run the docker CLI, return (seconds, peak RSS KiB of the CLI, CPU s of the CLI)."""
    cmd = [find_docker(), "-H", host] + [str(a) for a in args]
    return timed_process(cmd, client_env(host), stdout=stdout, stdin=stdin, timeout=timeout)[:3]


def timed_process(cmd, env, stdout=None, stdin=None, timeout=600, capture=False):
    """Run CMD; return (wall s, peak RSS KiB, CPU s, [(t, line)...]) and raise BenchError on failure.

    Peak RSS and CPU come from wait4() on that one process; with capture, its stdout+stderr
    lines are collected with the time (since start) at which each arrived.
    """
    lines = []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=stdin or subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture else (stdout or subprocess.DEVNULL),
                            stderr=subprocess.STDOUT if capture else subprocess.PIPE)
    out = proc.stdout if capture else proc.stderr
    reader = threading.Thread(target=lambda: lines.extend(
        (time.perf_counter() - start, raw.decode("utf-8", "replace").rstrip("\n")) for raw in out))
    reader.daemon = True
    reader.start()
    reaped = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise BenchError("%s took more than %d s" % (" ".join(cmd[:4]), timeout))
            time.sleep(0.005)
        reaped = True
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(10)
    finally:
        if not reaped:
            proc.kill()
            proc.wait()
        out.close()
    if proc.returncode != 0:
        text = "\n".join(l for _, l in lines[-30:])
        raise BenchError("%s exited %d:\n%s" % (" ".join(str(c) for c in cmd), proc.returncode, text))
    return wall, usage.ru_maxrss, usage.ru_utime + usage.ru_stime, lines


def gzip_single(path):
    """gzip -1 of a file in one stream on one core; return (seconds, compressed bytes)."""
    start = time.perf_counter()
    comp, size = zlib.compressobj(1, zlib.DEFLATED, 31), 0
    with open(path, "rb") as f:
        while True:
            data = f.read(GZ_CHUNK)
            if not data:
                break
            size += len(comp.compress(data))
    size += len(comp.flush())
    return time.perf_counter() - start, size


def gzip_member(data):
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


def gzip_parallel(path, workers):
    """gzip -1 of a file in independent 4 MiB members on WORKERS threads, in order."""
    start, size = time.perf_counter(), 0
    pending = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, open(path, "rb") as f:
        while True:
            data = f.read(GZ_CHUNK)
            if not data:
                break
            pending.append(pool.submit(gzip_member, data))
            if len(pending) >= 2 * workers:
                size += len(pending.popleft().result())
        while pending:
            size += len(pending.popleft().result())
    return time.perf_counter() - start, size


def dogestry(env, workdir, *args):
    """Run dogestry.py ARGS as a subprocess; return (wall, rss KiB, cpu s, timestamped lines)."""
    cmd = [sys.executable, str(DOGESTRY), "--tempdir", str(workdir / "tmp")] + [str(a) for a in args]
    return timed_process(cmd, env, capture=True, timeout=900)


def dir_bytes(path):
    """Bytes in all files under PATH."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


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
    facts.append("python: %s (%s)" % (platform.python_version(), sys.executable))
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


# --- report -----------------------------------------------------------------------------

def fmt(value, spec, missing="-"):
    return missing if value is None else spec % value


def print_report(facts, image, results, floors, checks):
    print()
    print("=" * 100)
    print("dogestry benchmark")
    print("=" * 100)
    for line in facts:
        print("  " + line)
    print("  image: %s  %s" % (TAG, image["id"]))
    print("    layers: %s" % ", ".join(image["layers"]))
    print("    saved tar %.1f MiB (%.1f MB): MB/s below are of this size" % (image["tar"] / MiB, image["tar"] / MB))
    print()
    head = "%-44s %8s %9s %9s %7s  %s" % ("stage", "seconds", "MB/s", "RSS MiB", "CPU s", "vs floor")
    print(head)
    print("-" * len(head))
    for r in results:
        ratio = ""
        if r.stage in floors:
            name, seconds = floors[r.stage]
            ratio = "%.2fx %s" % (r.seconds / seconds, name)
        print("%-44s %8.2f %9s %9s %7s  %s" % (r.stage, r.seconds, fmt(r.mbps, "%.1f"),
                                              fmt(r.rss_kib and r.rss_kib / 1024, "%.1f"),
                                              fmt(r.cpu, "%.2f"), ratio))
        if r.note:
            print("%-44s %s" % ("", r.note))
    print()
    print("targets")
    print("-------")
    for ok, text in checks:
        print("  %s  %s" % ("PASS" if ok else "FAIL", text))
    print()
    print("dogestry output (t = seconds since the process started)")
    print("-------------------------------------------------------")
    for r in results:
        if r.lines:
            print("  %s:" % r.stage)
            for t, line in r.lines:
                print("    %6.2f  %s" % (t, line))
    sys.stdout.flush()


# --- main -------------------------------------------------------------------------------

def run(args, state):
    """The whole benchmark; STATE records what to clean up."""
    base = args.workdir or tempfile.gettempdir()
    workdir = Path(tempfile.mkdtemp(prefix="dgstbench", dir=base)).resolve()
    state["workdir"] = workdir
    (workdir / "tmp").mkdir()
    size_bytes = args.size_mib * MiB
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
    env = client_env(host)
    facts = machine_facts(host, workdir)

    log("generating a %d MiB image (random / text / mixed layers)" % args.size_mib)
    t = time.perf_counter()
    state["image_built"] = True
    img = build_bench_image(host, workdir, size_bytes)
    if not img:
        raise BenchError("docker build produced no image %s" % TAG)
    diff_ids = json.loads(docker_cli(host, "image", "inspect", "-f", "{{json .RootFS.Layers}}", TAG).stdout)
    log("built %s in %.1f s" % (img[7:19], time.perf_counter() - t))

    results, floors = [], {}

    def add(result):
        results.append(result)
        log("%s: %.2f s%s" % (result.stage, result.seconds,
                              " (%.1f MB/s)" % result.mbps if result.mbps else ""))
        return result

    # floors: save, gzip, load
    with open(os.devnull, "wb") as devnull:
        wall, rss, cpu = timed_cli(host, "save", TAG, stdout=devnull)
    save_path = workdir / "image.tar"
    with open(str(save_path), "wb") as f:
        wall_file, rss_f, cpu_f = timed_cli(host, "save", TAG, stdout=f)
    tar_bytes = save_path.stat().st_size
    image = {"id": img, "tar": tar_bytes,
             "layers": ["%s" % d[7:19] for d in diff_ids]}
    save = add(Result("floor: docker save > /dev/null", wall, tar_bytes))
    add(Result("  (docker save > file on the work disk)", wall_file, tar_bytes))

    workers = os.cpu_count() or 1
    g1, g1_size = gzip_single(str(save_path))
    add(Result("  (gzip -1 of the saved tar, 1 thread)", g1, tar_bytes,
               note="-> %.1f MiB (%.0f%%)" % (g1_size / MiB, 100.0 * g1_size / tar_bytes)))
    gp, gp_size = gzip_parallel(str(save_path), workers)
    gzip_floor = add(Result("floor: gzip -1, 4 MiB members, %d threads" % workers, gp, tar_bytes,
                            note="-> %.1f MiB (%.0f%%)" % (gp_size / MiB, 100.0 * gp_size / tar_bytes)))

    push_floor_result = max((save, gzip_floor), key=lambda r: r.seconds)
    push_floor = (push_floor_result.stage.split(":")[1].split(",")[0].strip(), push_floor_result.seconds)

    # dogestry push, re-push, push --compress none (the image is on the engine for all three)
    store_gz, store_raw = workdir / "store-gzip", workdir / "store-raw"
    wall, rss, cpu, lines = dogestry(env, workdir, "push", store_gz, TAG)
    push = add(Result("dogestry push (gzip, empty store)", wall, tar_bytes, rss, cpu, lines,
                      note="store holds %.1f MiB" % (dir_bytes(store_gz) / MiB)))
    floors[push.stage] = push_floor
    wall, rss, cpu, lines = dogestry(env, workdir, "push", store_gz, TAG)
    repush = add(Result("dogestry re-push (unchanged image)", wall, None, rss, cpu, lines))
    wall, rss, cpu, lines = dogestry(env, workdir, "push", "--compress", "none", store_raw, TAG)
    raw = add(Result("dogestry push --compress none (reference)", wall, tar_bytes, rss, cpu, lines,
                     note="store holds %.1f MiB" % (dir_bytes(store_raw) / MiB)))
    floors[raw.stage] = ("save", save.seconds)

    # floor: docker load of the saved tar into an engine without the image's layers
    remove_image(host, TAG, diff_ids, handle)
    wall, rss, cpu = timed_cli(host, "load", "-q", "-i", save_path)
    load = add(Result("floor: docker load -i saved.tar (after rmi)", wall, tar_bytes))
    if image_id(host, TAG) != img:
        raise BenchError("docker load gave image %s, not %s" % (image_id(host, TAG), img))

    # dogestry pull into an engine without the image's layers
    remove_image(host, TAG, diff_ids, handle)
    wall, rss, cpu, lines = dogestry(env, workdir, "pull", store_gz, TAG)
    pulled = image_id(host, TAG)
    pull = add(Result("dogestry pull (gzip store, after rmi)", wall, tar_bytes, rss, cpu, lines,
                      note="image ID after pull: %s" % ("same" if pulled == img else "DIFFERENT: %s" % pulled)))
    floors[pull.stage] = ("load", load.seconds)

    checks = [
        (push.seconds <= TARGET_PUSH_RATIO * push_floor[1],
         "push %.2f s <= %.1f x slowest of (save %.2f s, gzip floor %.2f s) = %.2f s  [%.2fx]"
         % (push.seconds, TARGET_PUSH_RATIO, save.seconds, gzip_floor.seconds,
            TARGET_PUSH_RATIO * push_floor[1], push.seconds / push_floor[1])),
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
        (pulled == img, "pulled image ID is the pushed one (%s)" % img[7:19]),
    ]
    print_report(facts, image, results, floors, checks)
    if pulled != img:
        raise BenchError("the pulled image has ID %s, not %s" % (pulled, img))


def cleanup(state, keep):
    """Remove the image (external engine), stop our dockerd, remove the work dir."""
    host, handle, workdir = state.get("host"), state.get("dockerd"), state.get("workdir")
    if host and handle is None and state.get("image_built"):
        docker_cli(host, "rmi", "-f", TAG, check=False)
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
    args = parser.parse_args(argv)
    if args.size_mib < 3:
        parser.error("--size-mib must be at least 3")

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
