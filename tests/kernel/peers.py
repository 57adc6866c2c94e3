"""Small programs the kernel tests run inside pods and nodes (as `python -c` code)."""

# A server in a pod: answers each connection with "<tag>|<local addr>|<peer addr>|<data>".
SERVER = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[2])))
print("ready", flush=True)
while True:
    c, peer = s.accept()
    data = c.recv(65536)
    me = c.getsockname()
    c.sendall(f"{sys.argv[1]}|{me[0]}:{me[1]}|{peer[0]}:{peer[1]}|".encode() + data)
    c.close()
"""

# Plays the tunnel's outbound side: a listener on 127.0.0.1:15001 inside a pod netns, run from
# the node's sys cgroup so the cgroup/getsockopt program answers SO_ORIGINAL_DST.
FAKE_TUNNEL = """
import json, socket, struct, sys
from agent.host import netns
with netns.entered(sys.argv[1]):
    s = socket.create_server(("127.0.0.1", 15001))
print("ready", flush=True)
while True:
    c, peer = s.accept()
    try:
        raw = c.getsockopt(socket.SOL_IP, 80, 16)
    except OSError:  # the app closed before this accept: its entries are gone (as the tunnel)
        c.close()
        continue
    port, ip = struct.unpack("!2xH4s8x", raw)
    orig = f"{socket.inet_ntoa(ip)}:{port}"
    try:  # SO_SERVICE_DST (agent/abi.py): the VIP the original destination was chosen from
        port, ip = struct.unpack("!2xH4s8x", c.getsockopt(socket.SOL_IP, 0x4E4D, 16))
        svc = f"{socket.inet_ntoa(ip)}:{port}"
    except OSError:
        svc = None
    total = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        total += len(d)
    c.sendall(json.dumps({"orig": orig, "peer": f"{peer[0]}:{peer[1]}", "got": total,
                          "svc": svc}).encode())
    c.close()
"""

# The app in a pod: connect, report errno or (peer as the app sees it, reply).
CLIENT = """
import errno, json, socket, sys
ip, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket()
s.settimeout(5)
try:
    s.connect((ip, port))
except OSError as e:
    print(json.dumps({"errno": errno.errorcode.get(e.errno, str(e.errno))}))
    sys.exit(0)
peer = s.getpeername()
s.sendall(payload)
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    data += d
print(json.dumps({"peer": f"{peer[0]}:{peer[1]}", "reply": data.decode()}))
"""

# Shared end of the connect peers below: connect to (ip, port) with the prepared socket `s`,
# send one byte, report the reply or the errno as JSON.
_CONNECT_AND_REPORT = """
try:
    s.connect((ip, port))
    s.sendall(b"x")
    s.shutdown(socket.SHUT_WR)
    print(json.dumps({"reply": s.recv(4096).decode()}))
except OSError as e:
    print(json.dumps({"errno": errno.errorcode.get(e.errno, str(e.errno))}))
"""

# The tunnel's upstream connect: a marked socket created in a pod netns from the node's cgroup.
MARKED_CONNECT = """
import errno, json, socket, struct, sys
from agent.host import netns
ns, ip, port, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with netns.entered(ns):
    s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("I", mark))  # marks may exceed 2^31
s.settimeout(5)
""" + _CONNECT_AND_REPORT

# Runs batches of upstream-style connects for the differential test: each case is
# [mark, source ip, destination ip, port]; the socket is bound transparently to the source ip,
# connects without blocking, and reports EPERM (kernel deny) or OK. Lines in, lines out.
CONNECT_BATCH = """
import errno, json, socket, sys
from agent.host import netns
ns = sys.argv[1]
print("ready", flush=True)
for line in sys.stdin:
    out = []
    for mark, src, dst, port in json.loads(line):
        with netns.entered(ns):
            s = socket.socket()
        s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: bind any source address
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        s.bind((src, 0))
        s.setblocking(False)
        try:
            s.connect((dst, port))
            out.append("OK")
        except BlockingIOError:
            out.append("OK")
        except PermissionError:
            out.append("EPERM")
        finally:
            s.close()
    print(json.dumps(out), flush=True)
"""

# A minimal agent: installs (or adopts) the datapath at a cgroup, enrolls a pod, denies one
# destination, and waits to be killed.
AGENT = """
import ipaddress, sys, time
from pathlib import Path
from agent.datapath.datapath import Datapath
from agent.datapath.layouts import PolicyEntry, PolicyKey
from agent.datapath.options import BuildOptions
from agent.datapath.verdicts import Reason, KernelVerdict
cg, pin, ns, pod_ip, deny_ip = sys.argv[1:6]
dp = Datapath(Path(cg), BuildOptions(pin_dir=Path(pin)))
actions = dp.install()
dp.enroll(ns, 42, ipaddress.IPv4Address(pod_ip))
dp.apply_policy({PolicyKey(ipaddress.IPv4Address(deny_ip)): PolicyEntry(KernelVerdict.DENY,
                 Reason.POLICY_DENY)}, {})
print(",".join(actions), flush=True)
time.sleep(600)
"""

# The tunnel's inbound upstream: marked, bound transparently to the client's address, from the
# node's cgroup inside the destination pod, to that pod's own app.
TRANSPARENT_CONNECT = """
import errno, json, socket, sys
from agent.host import netns
ns, src, ip, port, mark = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from ztunnel import podnet
podnet.prepare_pod_netns(ns)
s = podnet.upstream(ns, mark, src)
s.setblocking(True)
s.settimeout(5)
""" + _CONNECT_AND_REPORT

# A hostile process inside a pod (its cgroup and netns, root, so it holds CAP_NET_ADMIN): it sets
# the tunnel's mark on its own socket, optionally binds its own address and adds the tunnel's
# routing rule for the mark (as ztunnel/podnet.py does for the real tunnel), then connects.
# Reports the reply, the errno, or "timeout".
FORGED_CONNECT = """
import errno, json, socket, struct, sys
from pyroute2 import IPRoute
ip, port, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bind_ip, rule = sys.argv[4], sys.argv[5]
family = socket.AF_INET6 if ":" in ip else socket.AF_INET
ipr = IPRoute()
if rule == "1":
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.rule("add", fwmark=0x539, fwmask=0xfff, table=100, priority=100)
    ipr.route("add", dst="0.0.0.0", dst_len=0, type="local", scope=254, oif=lo, table=100)
try:
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack("I", mark))
    if bind_ip:
        s.bind((bind_ip, 0))
    s.settimeout(3)
    try:
        s.connect((ip, port))
        s.sendall(b"forged")
        s.shutdown(socket.SHUT_WR)
        print(json.dumps({"reply": s.recv(4096).decode()}))
    except socket.timeout:
        print(json.dumps({"errno": "timeout"}))
    except OSError as e:
        print(json.dumps({"errno": errno.errorcode.get(e.errno, str(e.errno))}))
finally:
    if rule == "1":
        ipr.rule("del", fwmark=0x539, fwmask=0xfff, table=100, priority=100)
        ipr.route("del", dst="0.0.0.0", dst_len=0, type="local", scope=254, oif=lo, table=100)
    ipr.close()
"""

# A plaintext client with a short timeout: a dropped SYN shows as "timeout", not a 5 s hang.
# Optionally bound transparently to (source ip, source port) to replay a 4-tuple.
PLAIN_CONNECT = """
import errno, json, socket, sys
ip, port, src = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
if src:
    sip, sport = src.split(":")
    s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: a source address not on this host
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sip, int(sport)))
s.settimeout(2)
try:
    s.connect((ip, port))
    s.sendall(b"plain")
    s.shutdown(socket.SHUT_WR)
    print(json.dumps({"reply": s.recv(4096).decode()}))
except socket.timeout:
    print(json.dumps({"errno": "timeout"}))
except OSError as e:
    print(json.dumps({"errno": errno.errorcode.get(e.errno, str(e.errno))}))
"""

# The tunnel's inbound upstream held open: connect (marked, transparent source) from a node
# process into the pod, print the local port, wait for a line on stdin, then close.
HELD_UPSTREAM = """
import json, socket, sys
ns, src, ip, port, mark = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from ztunnel import podnet
podnet.prepare_pod_netns(ns)
s = podnet.upstream(ns, mark, src)
s.setblocking(True)
s.settimeout(5)
s.connect((ip, port))
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
sys.stdin.readline()
s.sendall(b"held")
s.shutdown(socket.SHUT_WR)
print(json.dumps({"reply": s.recv(4096).decode()}), flush=True)
s.close()
"""

# The app in a pod making many connects (load balancing): for each of N connects to (ip, port),
# the errno, or what the app sees (getpeername, getsockname) and the reply.
MANY_CONNECTS = """
import errno, json, socket, sys
ip, port, n, payload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
out = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((ip, port))
    except OSError as e:
        out.append({"errno": errno.errorcode.get(e.errno, str(e.errno))})
        s.close()
        continue
    peer, me = s.getpeername(), s.getsockname()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    out.append({"peer": f"{peer[0]}:{peer[1]}", "local": f"{me[0]}:{me[1]}",
                "reply": data.decode()})
print(json.dumps(out))
"""

# The app side for the Service differential test, inside an enrolled pod: it plays the tunnel's
# listener on 127.0.0.1:15001 itself, so each captured connect is accepted and its original
# destination (the endpoint the kernel chose) read back. Cases in: [[ip, port], ...]; out per
# case: ["OK", "endpoint:port"], ["EPERM", socket cookie] or [errno name, cookie].
APP_CONNECT_BATCH = """
import errno, json, socket, struct, sys
lst = socket.create_server(("127.0.0.1", 15001))
print("ready", flush=True)
for line in sys.stdin:
    out = []
    for ip, port in json.loads(line):
        s = socket.socket()
        cookie = struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, 57, 8))[0]  # SO_COOKIE
        s.settimeout(5)
        try:
            s.connect((ip, port))
        except OSError as e:
            out.append([errno.errorcode.get(e.errno, str(e.errno)), cookie])
            s.close()
            continue
        c, _ = lst.accept()
        dport, dip = struct.unpack("!2xH4s8x", c.getsockopt(socket.SOL_IP, 80, 16))
        out.append(["OK", f"{socket.inet_ntoa(dip)}:{dport}"])
        c.close()
        s.close()
    print(json.dumps(out), flush=True)
"""

# An app in a pod driven line by line on stdin, holding its sockets open: "connect IP PORT
# [LOCALPORT]" (LOCALPORT: bind it first with SO_REUSEADDR) answers "ok N" (socket N kept) or
# "err ERRNO" (the failed socket kept too, until "close N"); "close N" answers "closed".
HOLDER = """
import errno, socket, sys
import itertools
socks, numbers = {}, itertools.count()
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "connect":
        s = socket.socket()
        s.settimeout(5)
        n = next(numbers)
        socks[n] = s
        try:
            if len(cmd) > 3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", int(cmd[3])))
            s.connect((cmd[1], int(cmd[2])))
            print(f"ok {n}", flush=True)
        except OSError as e:
            print(f"err {errno.errorcode.get(e.errno, e.errno)} {n}", flush=True)
    elif cmd[0] == "close":
        socks.pop(int(cmd[1])).close()
        print("closed", flush=True)
"""
