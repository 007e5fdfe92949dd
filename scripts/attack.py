#!/usr/bin/env python3
"""Attack scenarios of issue 9 for the "under attack" table of BENCHMARKS.md.

Each scenario runs for --seconds against a server on loopback (refuses other
hosts), while BENCHMARKS.md's bystander (`crm-chat-load pairs --pairs 1`)
measures send->ack latency. Prints the server's peak RSS (from /proc) as JSON.

    python3 scripts/attack.py --url http://127.0.0.1:18800 --pid PID \
        --secret ... --scenario history|junk|slowloris|reconnect|typing|biggroup|fatbodies|churn \
        [--api http://127.0.0.1:9090 --api-key ...]

biggroup, fatbodies and churn are the findings 1, 3 and 7 of issue 22 (big
groups through the service API, bodies that fill Valkey, connect churn of a
user in many groups); biggroup and churn need --api (the internal listener).

Needs `pip install websockets pyjwt` (a venv is fine).
"""
import argparse
import asyncio
import json
import random
import socket
import string
import time
from urllib.parse import urlparse

import jwt
import websockets


def token(secret, user, ttl=3600):
    return jwt.encode({"sub": user, "exp": int(time.time()) + ttl}, secret, algorithm="HS256")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def ws(url, secret, user, **kw):
    return await websockets.connect(
        url.replace("http", "ws") + "/ws/chat",
        additional_headers={"Authorization": f"Bearer {token(secret, user)}"},
        max_size=None,
        **kw,
    )


async def history(a, stop):
    """A user fills a conversation with 4000-char messages; a connection that
    never reads asks for 200-message pages as fast as it can."""
    conv = "dm:attacker:victim"
    w = await ws(a.url, a.secret, "attacker")
    for i in range(400):
        await w.send(json.dumps({"type": "send", "id": i, "conversation": conv,
                                 "client_msg_id": f"h{i}", "body": "x" * 4000}))
    await asyncio.sleep(1)
    await w.close()
    n = 0
    while time.time() < stop:
        try:
            r = await ws(a.url, a.secret, "attacker", max_queue=1)
            # Never read: the reader's buffer and the socket fill up.
            r.transport.pause_reading()
            while time.time() < stop:
                # A server that stops reading would block this send forever.
                await asyncio.wait_for(
                    r.send(json.dumps({"type": "history", "id": n, "conversation": conv, "limit": 200})), 1)
                n += 1
                await asyncio.sleep(0)
        except Exception:
            await asyncio.sleep(0.05)
    return {"history_requests": n}


async def junk(a, stop):
    """Frames on never-used conversation ids."""
    w = await ws(a.url, a.secret, "junker")
    n = 0
    letters = string.ascii_lowercase
    while time.time() < stop:
        rid = "".join(random.choices(letters, k=12))
        kind = n % 3
        if kind == 0:
            f = {"type": "read", "conversation": f"dm:junker:z{rid}", "seq": 1}
        elif kind == 1:
            f = {"type": "typing", "conversation": f"dm:junker:z{rid}"}
        else:
            f = {"type": "delivered", "conversation": f"g{rid}", "seq": 1}
        try:
            await w.send(json.dumps(f))
        except Exception:
            w = await ws(a.url, a.secret, "junker")
        n += 1
        if n % 200 == 0:
            await asyncio.sleep(0)
    return {"junk_frames": n}


async def slowloris(a, stop):
    """2000 sockets: half idle, half trickling a request head."""
    host, port = urlparse(a.url).hostname, urlparse(a.url).port
    socks = []
    opened = 0
    while time.time() < stop:
        while len(socks) < 2000:
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect_ex((host, port))
            except OSError:
                break
            socks.append([s, len(socks) % 2, b"GET /ws/chat HTTP/1.1\r\nHost: x\r\n"])
            opened += 1
        keep = []
        for s, trickle, rest in socks:
            try:
                if trickle and rest:
                    s.send(rest[:1])
                    rest = rest[1:]
                keep.append([s, trickle, rest])
            except OSError:
                s.close()
        socks = keep
        await asyncio.sleep(1)
    for s, _, _ in socks:
        s.close()
    return {"sockets_opened": opened}


async def reconnect(a, stop):
    """A user with 3000 direct conversations connects and disconnects in a loop."""
    w = await ws(a.url, a.secret, "flapper")
    for i in range(3000):
        await w.send(json.dumps({"type": "send", "conversation": f"dm:flapper:p{i:05d}",
                                 "client_msg_id": f"r{i}", "body": "hi"}))
        if i % 100 == 99:
            await asyncio.sleep(0.3)
    await w.close()
    cycles = 0
    while time.time() < stop:
        try:
            w = await ws(a.url, a.secret, "flapper")
            await w.recv()
            await w.close()
            cycles += 1
        except Exception:
            await asyncio.sleep(0.05)
    return {"cycles": cycles}


async def typing(a, stop):
    """A user reconnects and types in `general` as fast as it can."""
    n = 0
    while time.time() < stop:
        try:
            w = await ws(a.url, a.secret, "typist")
            for _ in range(50):
                await w.send(json.dumps({"type": "typing", "conversation": "general"}))
                n += 1
            await w.close()
        except Exception:
            await asyncio.sleep(0.05)
    return {"typing_frames": n}


def api_call(a, method, path, body):
    """A service API call on the internal listener (blocking; run in a thread)."""
    import urllib.request
    req = urllib.request.Request(a.api + path, method=method, data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {a.api_key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def biggroup(a, stop):
    """PUTs a group of 20,000 members, then one of 90,000, again and again
    (a new group id each time, every member added), while two members of it
    are connected (finding 1)."""
    held = [await ws(a.url, a.secret, "m00000"), await ws(a.url, a.secret, "m89999")]
    puts, statuses, took = 0, {}, []
    while time.time() < stop:
        n = 20_000 if puts % 2 == 0 else 90_000
        members = [f"m{i:05d}" for i in range(n)]
        t = time.time()
        st = await asyncio.to_thread(api_call, a, "PUT", f"/api/v1/conversations/big-{puts}-{random.random():.6f}",
                                     {"title": "big", "members": members})
        took.append(round(time.time() - t, 2))
        statuses[st] = statuses.get(st, 0) + 1
        puts += 1
    events = 0
    for w in held:
        try:
            while True:
                m = json.loads(await asyncio.wait_for(w.recv(), 0.5))
                events += m.get("type") == "conversation"
        except Exception:
            pass
        await w.close()
    return {"puts": puts, "statuses": statuses, "put_seconds": took, "conversation_events_at_2_members": events}


async def fatbodies(a, stop):
    """One user sends 4000-character bodies of control characters (~24 KB of
    JSON each) as fast as the server lets it (finding 3)."""
    body = "\u0001" * 4000
    acked = limited = n = 0
    w = await ws(a.url, a.secret, "filler")
    while time.time() < stop:
        await w.send(json.dumps({"type": "send", "id": n, "conversation": "dm:filler:victim",
                                 "client_msg_id": f"f{n}-{random.random()}", "body": body}))
        n += 1
        try:
            while True:
                m = json.loads(await asyncio.wait_for(w.recv(), 0.001 if n % 50 else 0.2))
                if m.get("type") == "ack":
                    acked += 1
                elif m.get("type") == "error" and m["error"]["code"] == "rate_limited":
                    limited += 1
                    await asyncio.sleep(m["error"].get("retry_after_ms", 100) / 1000)
        except asyncio.TimeoutError:
            pass
        except Exception:
            w = await ws(a.url, a.secret, "filler")
    await w.close()
    return {"sent": n, "acked": acked, "rate_limited": limited, "body_bytes_acked": acked * 4000 * 6}


async def churn(a, stop):
    """A user who belongs to 300 groups connects and closes in a loop (finding 7)."""
    for g in range(300):
        await asyncio.to_thread(api_call, a, "PUT", f"/api/v1/conversations/churn-{g}",
                                {"title": "g", "members": ["churner", f"other{g}"]})
    cycles = refused = 0
    while time.time() < stop:
        try:
            w = await ws(a.url, a.secret, "churner")
            await w.recv()
            await w.close()
            cycles += 1
        except Exception:
            refused += 1
            await asyncio.sleep(0.01)
    return {"cycles": cycles, "refused": refused}


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--scenario", required=True, choices=["history", "junk", "slowloris", "reconnect", "typing",
                                                               "biggroup", "fatbodies", "churn"])
    p.add_argument("--api", default="http://127.0.0.1:9090")
    p.add_argument("--api-key", default="crm-chat-local-development-api-key")
    p.add_argument("--seconds", type=float, default=20)
    a = p.parse_args()
    if urlparse(a.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loopback only")
    before = rss_kib(a.pid)
    peak = before
    stop = time.time() + a.seconds
    task = asyncio.create_task(globals()[a.scenario](a, stop))
    while not task.done() and time.time() < stop + 10:
        peak = max(peak, rss_kib(a.pid))
        await asyncio.sleep(0.2)
    if not task.done():
        task.cancel()
        out = {"note": "scenario did not stop in time"}
    else:
        out = task.result()
    out.update({"scenario": a.scenario, "rss_before_mib": round(before / 1024, 1),
                "rss_peak_mib": round(peak / 1024, 1), "rss_after_mib": round(rss_kib(a.pid) / 1024, 1)})
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
