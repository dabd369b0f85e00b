#!/usr/bin/env python3
"""4-connection nbdcopy reads: server variants taking turns, with CPU
accounting of nbdkit (from /proc/PID/stat) and of nbdcopy (wait4 rusage).

usage: reads.py OUTDIR SIZE ROUNDS BUDGET_S MEMPLUGIN SRC [variant-filter]
Variants are defined in VARIANTS below. Each measurement is one
`nbdcopy --connections=4 URI null:` of the whole export.
"""
import json, os, subprocess, sys, time

out, size, rounds, budget, memplugin, src = sys.argv[1:7]
only = sys.argv[7].split(",") if len(sys.argv) > 7 else None
rounds, budget = int(rounds), float(budget)
T0 = time.time()
TCK = os.sysconf("SC_CLK_TCK")
SOCK, PIDF = "/tmp/r.sock", "/tmp/r.pid"
URI = f"nbd+unix:///?socket={SOCK}"
D = ".devreads"

# name, plugin, args, threads, env, request sizes to read with
VARIANTS1 = [
    ("mem-t16", memplugin, ["allocator=malloc"], 16, {}, ["default", "64K", "1M"]),
    ("cuda-t16", f"{D}/main.so", ["backend=cuda"], 16, {}, ["default", "64K", "1M"]),
    ("cuda-s256K", f"{D}/main.so", ["backend=cuda", "staging=256K"], 16, {}, ["default"]),
    ("cuda-l16", f"{D}/main.so", ["backend=cuda", "lanes=16"], 16, {}, ["default"]),
    ("cuda-s256K-l16", f"{D}/main.so", ["backend=cuda", "staging=256K", "lanes=16"], 16, {}, ["default"]),
    ("mem-t32", memplugin, ["allocator=malloc"], 32, {}, ["default"]),
    ("cuda-t32", f"{D}/main.so", ["backend=cuda"], 32, {}, ["default"]),
    ("vulkan-t16", f"{D}/main.so", ["backend=vulkan"], 16, {}, ["default"]),
    ("cuda-spin0", f"{D}/proto.so", ["backend=cuda"], 16, {"VRAMSWAP_SPIN_US": "0"}, ["default"]),
    ("cuda-poll1", f"{D}/proto.so", ["backend=cuda"], 16, {"VRAMSWAP_MAX_POLLERS": "1"}, ["default"]),
    ("cuda-s64K-l256", f"{D}/main.so", ["backend=cuda", "staging=64K", "lanes=256"], 16, {}, ["default"]),
    ("host-t16", f"{D}/proto.so", ["backend=host"], 16, {"VRAMSWAP_ALLOW_HOST": "1"}, ["default", "1M"]),
]
BG = [f"{D}/dma_load", "--backend", os.environ.get("BGB", "cuda"), "--threads", "4", "--op", "256K", "--footprint", "2M"]
VARIANTS2 = [
    ("mem-t16", memplugin, ["allocator=malloc"], 16, {}, ["default"]),
    ("cuda-t16", f"{D}/main.so", ["backend=cuda"], 16, {}, ["default"]),
    ("host-t16", f"{D}/proto.so", ["backend=host"], 16, {"VRAMSWAP_ALLOW_HOST": "1"}, ["default"]),
    ("cuda-fakedl", f"{D}/proto.so", ["backend=cuda"], 16, {"VRAMSWAP_FAKE_DL": "1"}, ["default"]),
    ("mem+bg10", memplugin, ["allocator=malloc"], 16, {}, ["default"], BG + ["--rate", "10"]),
    ("host+bg10", f"{D}/proto.so", ["backend=host"], 16, {"VRAMSWAP_ALLOW_HOST": "1"}, ["default"], BG + ["--rate", "10"]),
    ("mem+bg10copy", memplugin, ["allocator=malloc"], 16, {}, ["default"], BG + ["--rate", "10", "--copy"]),
    ("mem+bg20", memplugin, ["allocator=malloc"], 16, {}, ["default"], BG + ["--rate", "20"]),
]
BGBIG = [f"{D}/dma_load", "--backend", "cuda", "--threads", "4", "--op", "2M", "--footprint", "8M"]
VARIANTS3 = [
    ("mem-t16", memplugin, ["allocator=malloc"], 16, {}, ["default"]),
    ("cuda-t16", f"{D}/main.so", ["backend=cuda"], 16, {}, ["default"]),
    ("mem+bg10", memplugin, ["allocator=malloc"], 16, {}, ["default"], BG + ["--rate", "10"]),
    ("mem+bgfake10", memplugin, ["allocator=malloc"], 16, {}, ["default"], BG + ["--rate", "10", "--fake"]),
    ("mem+bg10big", memplugin, ["allocator=malloc"], 16, {}, ["default"], BGBIG + ["--rate", "10"]),
]
VARIANTS4 = [
    ("mem-t16", memplugin, ["allocator=malloc"], 16, {}, ["default"]),
    ("cuda-t16", f"{D}/main.so", ["backend=cuda"], 16, {}, ["default"]),
    ("cuda-nobsync", f"{D}/proto.so", ["backend=cuda"], 16, {"VRAMSWAP_NO_BSYNC": "1"}, ["default"]),
]
VARIANTS = {"2": VARIANTS2, "3": VARIANTS3, "4": VARIANTS4}.get(os.environ.get("SET"), VARIANTS1)
if only:
    VARIANTS = [v for v in VARIANTS if v[0] in only]
REPS = {"default": 3, "64K": 1, "1M": 1}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def proc_stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime=14, stime=15, minflt=10, majflt=12
    return {
        "utime": int(fields[11]) / TCK,
        "stime": int(fields[12]) / TCK,
        "minflt": int(fields[7]),
        "threads": int(fields[17]),
    }


def machine():
    d = {}
    with open("/proc/stat") as f:
        for line in f:
            p = line.split()
            if p[0] == "cpu":
                v = list(map(int, p[1:]))
                d["idle"] = v[3] + v[4]
                d["total"] = sum(v[:8])
            elif p[0] in ("ctxt", "intr"):
                d[p[0]] = int(p[1])
    return d


def start(name, plugin, args, threads, env):
    for p in (SOCK, PIDF):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    e = dict(os.environ, **env)
    cmd = ["nbdkit", "-U", SOCK, "-t", str(threads), "--pidfile", PIDF, plugin] + args + [f"size={size}"]
    os.makedirs("/tmp/nlogs", exist_ok=True)
    logf = open(f"/tmp/nlogs/nbdkit-{name}.log", "a")
    r = subprocess.run(cmd, env=e, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    if r.returncode != 0:
        log(name, "nbdkit failed", r.returncode)
        return None
    for _ in range(200):
        if os.path.exists(PIDF) and os.path.exists(SOCK):
            if subprocess.run(["nbdinfo", "--size", URI], capture_output=True).returncode == 0:
                with open(PIDF) as f:
                    return int(f.read().strip())
        time.sleep(0.1)
    log(name, "server did not come up")
    return None


def stop(pid):
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def nbdcopy(argv):
    t = time.time()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t
    err = p.stderr.read().decode()[-500:]
    return wall, status, ru, err


def measure(pid, rs, gbytes):
    argv = ["nbdcopy", "--connections=4"]
    if rs != "default":
        argv.append(f"--request-size={int(rs[:-1]) * units[rs[-1]]}")
    argv += [URI, "null:"]
    s0, m0 = proc_stat(pid), machine()
    wall, status, ru, err = nbdcopy(argv)
    s1, m1 = proc_stat(pid), machine()
    busy = 1 - (m1["idle"] - m0["idle"]) / max(1, m1["total"] - m0["total"])
    k_cpu = (s1["utime"] - s0["utime"]) + (s1["stime"] - s0["stime"])
    c_cpu = ru.ru_utime + ru.ru_stime
    return {
        "rc": status, "err": err.strip() if status else "",
        "wall": wall, "GBps": gbytes / wall,
        "nbdkit_cpu": k_cpu, "nbdkit_usr": s1["utime"] - s0["utime"], "nbdkit_sys": s1["stime"] - s0["stime"],
        "nbdkit_minflt": s1["minflt"] - s0["minflt"],
        "nbdcopy_cpu": c_cpu, "nbdcopy_usr": ru.ru_utime, "nbdcopy_sys": ru.ru_stime,
        "nbdcopy_nvcsw": ru.ru_nvcsw, "nbdcopy_nivcsw": ru.ru_nivcsw, "nbdcopy_minflt": ru.ru_minflt,
        "busy": busy, "ctxt": m1["ctxt"] - m0["ctxt"], "intr": m1["intr"] - m0["intr"],
        "nbdkit_cores": k_cpu / wall, "nbdcopy_cores": c_cpu / wall,
        "nbdkit_cs_per_GB": k_cpu / gbytes, "nbdcopy_cs_per_GB": c_cpu / gbytes,
    }


units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
gbytes = int(size[:-1]) * units[size[-1]] / 1e9
rows = open(os.path.join(out, "reads.jsonl"), "a")
for rnd in range(1, rounds + 1):
    order = VARIANTS if rnd % 2 else list(reversed(VARIANTS))
    for name, plugin, args, threads, env, sizes, *bgl in order:
        if time.time() - T0 > budget:
            log("budget reached, stop before", name, "round", rnd)
            break
        t = time.time()
        pid = start(name, plugin, args, threads, env)
        if pid is None:
            continue
        tstart = time.time() - t
        fill = subprocess.run(["nbdcopy", "--connections=4", src, URI], capture_output=True, text=True)
        if fill.returncode:
            log(name, "fill failed", fill.stderr[-500:])
        bg = None
        if bgl:
            bgenv = dict(os.environ, VRAMSWAP_SPIN_US="0")
            if "--fake" in bgl[0]:
                bgenv["VRAMSWAP_FAKE_DL"] = "1"
            bg = subprocess.Popen([a for a in bgl[0] if a != "--fake"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=bgenv)
            line = bg.stdout.readline().decode().strip()
            if line != "ready":
                log(name, "bg load did not start:", line, bg.stderr.read().decode()[-800:])
            tbg = time.time()
        for rs in sizes:
            for rep in range(REPS[rs]):
                r = measure(pid, rs, gbytes)
                r.update(variant=name, round=rnd, rs=rs, rep=rep, start_s=tstart)
                rows.write(json.dumps(r) + "\n")
                rows.flush()
                log(f"{name:16s} r{rnd} rs={rs:7s} {r['GBps']:6.2f} GB/s  nbdkit {r['nbdkit_cs_per_GB']:.3f} "
                    f"nbdcopy {r['nbdcopy_cs_per_GB']:.3f} core-s/GB  busy {r['busy']*100:.0f}%  "
                    f"nbdcopy ivcsw {r['nbdcopy_nivcsw']} vcsw {r['nbdcopy_nvcsw']} {r['err']}")
        if bg:
            bg.stdin.close()
            _, st_, ru = os.wait4(bg.pid, 0)
            msg = bg.stderr.read().decode().strip()[-300:]
            rec = {"bg": name, "round": rnd, "wall": time.time() - tbg, "cpu": ru.ru_utime + ru.ru_stime, "msg": msg}
            rows.write(json.dumps(rec) + "\n")
            log(f"{name:16s} r{rnd} bg: {msg} cpu {rec['cpu']:.2f}s over {rec['wall']:.2f}s")
        stop(pid)
        time.sleep(0.5)
    else:
        continue
    break
log("done")
