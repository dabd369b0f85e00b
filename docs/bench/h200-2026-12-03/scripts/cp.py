# usage: cp.py NAME ROUND CONNS URI PID BYTES : one nbdcopy URI null:, with CPU
import os, resource, subprocess, sys, time
name, rnd, conns, uri, pid, size = sys.argv[1:7]
def cpu(p):
    f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
r0 = resource.getrusage(resource.RUSAGE_CHILDREN); c0 = cpu(pid); t0 = time.time()
subprocess.run(["nbdcopy", f"--connections={conns}", uri, "null:"], check=True)
t1 = time.time(); c1 = cpu(pid); r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
gb = int(size) / 1e9; wall = t1 - t0
print(f"{rnd},{name},cp{conns},{gb/wall:.2f},GB/s,nbdkit={(c1-c0)/wall:.2f}cores,"
      f"nbdcopy_usr={(r1.ru_utime-r0.ru_utime)/gb:.3f}cs/GB,nbdcopy_sys={(r1.ru_stime-r0.ru_stime)/gb:.3f}cs/GB,"
      f"nbdcopy={(r1.ru_utime-r0.ru_utime+r1.ru_stime-r0.ru_stime)/wall:.2f}cores", flush=True)
