#!/usr/bin/env python3
"""Run the chat container as Kubernetes would run the rendered chart, with Docker.

Called by scripts/pod-test.sh (which renders the chart, provides PyYAML and
websockets in a venv, and removes every container and network labelled with
the run id afterwards, whatever happens here):

  pod-test.py --image crm-chat:dev --rendered render.yaml --release chat \
              --namespace crm-chat --run-id ID --name default --tmp DIR

From the rendered manifests it takes the chat container of the Deployment
exactly: envFrom and env (ConfigMaps and Secrets resolved from the render; the
chat's auth Secret values replaced by generated 40-character ones; fieldRefs
filled in), command/args, ports, probes, volume mounts (Secret/ConfigMap files,
emptyDir), the pod and container securityContext (user, fsGroup, read-only
root, dropped capabilities, no privilege escalation) and the memory limit. It
adds the service-link variables Kubernetes injects for every Service of the
render (for a release named "chat": CHAT_CRM_CHAT_PORT=tcp://..., ...) even
though the chart turns service links off: the server must tolerate them. With
the bundled Valkey it runs that StatefulSet's container the same way, under the
Service's name. Then it checks:

  * the startup, liveness and readiness probe paths answer 200 on the probe port;
  * the public port serves the demo page and no /api/v1, /metrics or health;
  * the internal port serves the service API (with the key) and /metrics;
  * a chat works through the public port: two users, token signed with the
    secret the pod got, hello -> welcome, send -> ack and the message to both;
  * SIGTERM: /readyz turns 503 at once, the open connection gets close 1012,
    and the process exits 0 within terminationGracePeriodSeconds.

Every wait is bounded. Nothing listens beyond 127.0.0.1.
"""

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

LABEL = "org.crm-chat.pod-test"
TIMEOUT = 10  # seconds, one HTTP request or WebSocket frame


class Failure(Exception):
    pass


def say(msg):
    print(f"   {msg}", flush=True)


def check(cond, msg):
    if not cond:
        raise Failure(msg)
    say(f"ok: {msg}")


def docker(*args, timeout=60, check_rc=True):
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check_rc and r.returncode != 0:
        raise Failure(f"docker {' '.join(args[:3])} ... failed ({r.returncode}): {r.stderr.strip()}")
    return r


def gen_secret(n=40):
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


# --- the render --------------------------------------------------------------


class Render:
    def __init__(self, path, release, namespace):
        self.docs = [d for d in yaml.safe_load_all(open(path)) if d]
        self.release, self.namespace = release, namespace

    def find(self, kind, name=None):
        for d in self.docs:
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name):
                return d
        return None

    def all(self, kind):
        return [d for d in self.docs if d["kind"] == kind]


def secret_data(secret):
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


class Pod:
    """One pod of a workload in the render, resolved into what `docker run` needs."""

    def __init__(self, render, workload, container_name, pod_name, secrets_override, tmp):
        self.render, self.workload = render, workload
        self.spec = workload["spec"]["template"]["spec"]
        self.container = next(c for c in self.spec["containers"] if c["name"] == container_name)
        self.pod_name, self.secrets_override, self.tmp = pod_name, secrets_override, tmp

    def secret(self, name):
        if name in self.secrets_override:
            return self.secrets_override[name]
        s = self.render.find("Secret", name)
        if s is None:
            raise Failure(f"Secret {name} is not in the render (an existingSecret?): not supported by this test")
        return secret_data(s)

    def configmap(self, name):
        c = self.render.find("ConfigMap", name)
        if c is None:
            raise Failure(f"ConfigMap {name} is not in the render")
        return {k: str(v) for k, v in (c.get("data") or {}).items()}

    def env(self):
        """envFrom, then env (later entries win), as the kubelet builds it."""
        env = {}
        for src in self.container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                data = self.configmap(src["configMapRef"]["name"])
            elif "secretRef" in src:
                data = self.secret(src["secretRef"]["name"])
            else:
                raise Failure(f"envFrom {src}: not supported")
            env.update({prefix + k: v for k, v in data.items()})
        for e in self.container.get("env") or []:
            if "value" in e:
                env[e["name"]] = str(e["value"])
                continue
            vf = e.get("valueFrom") or {}
            if "fieldRef" in vf:
                path = vf["fieldRef"]["fieldPath"]
                env[e["name"]] = {
                    "metadata.name": self.pod_name,
                    "metadata.namespace": self.render.namespace,
                    "spec.nodeName": "kind-worker",
                    "status.podIP": "10.244.1.23",
                    "status.hostIP": "172.18.0.2",
                    "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
                }[path]
            elif "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                env[e["name"]] = self.secret(ref["name"])[ref["key"]]
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                env[e["name"]] = self.configmap(ref["name"])[ref["key"]]
            else:
                raise Failure(f"env {e['name']}: {vf} not supported")
        return env

    def security(self):
        """`docker run` flags from the pod and container securityContext (container wins)."""
        pod_sc = self.spec.get("securityContext") or {}
        sc = {**pod_sc, **(self.container.get("securityContext") or {})}
        flags, seen = [], {}
        if "runAsUser" in sc:
            user = str(sc["runAsUser"]) + (f":{sc['runAsGroup']}" if "runAsGroup" in sc else "")
            flags += ["--user", user]
            seen["user"] = user
        if "fsGroup" in pod_sc:
            flags += ["--group-add", str(pod_sc["fsGroup"])]
        if sc.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
            seen["read_only"] = True
        caps = sc.get("capabilities") or {}
        for c in caps.get("drop") or []:
            flags += ["--cap-drop", c]
        for c in caps.get("add") or []:
            flags += ["--cap-add", c]
        seen["cap_drop_all"] = "ALL" in (caps.get("drop") or [])
        if sc.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
            seen["no_new_privileges"] = True
        if sc.get("privileged"):
            raise Failure("privileged container in the render")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in (None, "RuntimeDefault"):
            raise Failure(f"seccompProfile {seccomp}: not supported by this test")
        return flags, seen

    def mounts(self):
        """-v flags for the volume mounts: Secret and ConfigMap files are written to a
        temporary directory (readable as with fsGroup), emptyDir and claims are empty
        directories anyone may write.
        Returns (flags, {path in container: content})."""
        volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        flags, files = [], {}
        for m in self.container.get("volumeMounts") or []:
            v = volumes.get(m["name"])
            if v is None or "emptyDir" in v or "persistentVolumeClaim" in v:
                # emptyDir, a claim or a volumeClaimTemplate (StatefulSet): an empty directory
                # the pod's user can write (fsGroup does that in Kubernetes). A bind
                # mount, not a tmpfs: Docker gives a tmpfs over an image VOLUME the
                # image directory's owner and mode.
                d = tempfile.mkdtemp(dir=self.tmp, prefix=f"vol-{m['name']}-")
                os.chmod(d, 0o1777)
                flags += ["-v", f"{d}:{m['mountPath']}:rw"]
                continue
            if "secret" in v:
                data, items = self.secret(v["secret"]["secretName"]), v["secret"].get("items")
            elif "configMap" in v:
                data, items = self.configmap(v["configMap"]["name"]), v["configMap"].get("items")
            else:
                raise Failure(f"volume {v['name']}: kind not supported by this test")
            items = items or [{"key": k, "path": k} for k in data]
            d = tempfile.mkdtemp(dir=self.tmp, prefix=f"vol-{v['name']}-")
            for it in items:
                p = os.path.join(d, it["path"])
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "w") as f:
                    f.write(data[it["key"]])
                os.chmod(p, 0o444)
            os.chmod(d, 0o755)
            if m.get("subPath"):
                src = os.path.join(d, m["subPath"])
                files[m["mountPath"]] = open(src).read()
                flags += ["-v", f"{src}:{m['mountPath']}:ro"]
            else:
                for it in items:
                    files[os.path.join(m["mountPath"], it["path"])] = data[it["key"]]
                flags += ["-v", f"{d}:{m['mountPath']}:ro"]
        return flags, files

    def ports(self):
        return {p.get("name", str(p["containerPort"])): int(p["containerPort"]) for p in self.container.get("ports") or []}

    def memory_flags(self):
        mem = ((self.container.get("resources") or {}).get("limits") or {}).get("memory")
        if not mem:
            return []
        m = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi)?", str(mem))
        if not m:
            return []
        mult = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}[m.group(2)]
        return ["--memory", str(int(m.group(1)) * mult)]

    def command_args(self):
        """Kubernetes command replaces the ENTRYPOINT, args replace the CMD."""
        cmd, args = self.container.get("command"), self.container.get("args")
        entry = ["--entrypoint", cmd[0]] if cmd else []
        rest = (cmd[1:] if cmd else []) + (args or [])
        return entry, rest


def service_links(render):
    """The variables Kubernetes injects into a pod for every Service of its
    namespace when service links are on (plus the kubernetes Service's, always)."""
    env = {}

    def add(name, ip, ports):
        n = name.upper().replace("-", "_")
        env[f"{n}_SERVICE_HOST"] = ip
        env[f"{n}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{n}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
        for p in ports:
            proto = p.get("protocol", "TCP")
            if p.get("name"):
                env[f"{n}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p["port"])
            base = f"{n}_PORT_{p['port']}_{proto}"
            env[base] = f"{proto.lower()}://{ip}:{p['port']}"
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(p["port"])
            env[f"{base}_ADDR"] = ip

    add("kubernetes", "10.96.0.1", [{"name": "https", "port": 443, "protocol": "TCP"}])
    i = 0
    for svc in render.all("Service"):
        spec = svc["spec"]
        if spec.get("clusterIP") == "None" or spec.get("type") == "ExternalName":
            continue
        i += 1
        add(svc["metadata"]["name"], f"10.0.0.{i}", spec["ports"])
    return env


# --- HTTP and WebSocket --------------------------------------------------------


def http(url, headers=None, timeout=TIMEOUT):
    """(status, body) or (None, error text)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)


def jwt(secret, sub, name, ttl=600):
    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "name": name, "iat": now, "exp": now + ttl}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def recv_until(ws, want, what, within=TIMEOUT):
    """Frames until one satisfies want(frame); returns it and the frames before it."""
    deadline = time.monotonic() + within
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure(f"no {what} within {within} s; got {seen}")
        try:
            f = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            continue
        if want(f):
            return f, seen
        seen.append(f)


def hello(stack, url, secret, user, name):
    # Entered as a context manager (newer websockets warn otherwise); the stack
    # closes it at the end.
    ws = stack.enter_context(ws_connect(url, open_timeout=TIMEOUT, close_timeout=3, max_size=2**20))
    ws.send(json.dumps({"type": "hello", "id": 1, "token": jwt(secret, user, name)}))
    w, _ = recv_until(ws, lambda f: f.get("type") in ("welcome", "error"), f"welcome for {user}")
    if w["type"] != "welcome":
        raise Failure(f"hello as {user}: {w}")
    return ws, w


# --- containers ----------------------------------------------------------------


def run_container(args, run_id, name, network, alias, hostname, env, flags, image, entry, rest):
    env_file = os.path.join(args.tmp, f"{name}.env")
    with open(env_file, "w") as f:
        for k, v in env.items():
            if "\n" in v:
                raise Failure(f"env {k} holds a newline: not expressible in a docker env file")
            f.write(f"{k}={v}\n")
    os.chmod(env_file, 0o600)
    cmd = ["run", "-d", "--name", name, "--label", f"{LABEL}={run_id}", "--network", network,
           "--network-alias", alias, "--hostname", hostname, "--env-file", env_file,
           *flags, *entry, image, *rest]
    docker(*cmd)
    return name


def published(container, port):
    r = docker("port", container, f"{port}/tcp", check_rc=False)
    if r.returncode != 0:
        raise Failure(f"{container}: no published port {port} ({running(container)}: running, exit code); "
                      f"logs:\n{logs(container)}")
    out = r.stdout.strip().splitlines()
    hp = next((line for line in out if line.startswith("127.0.0.1:")), None)
    if not hp:
        raise Failure(f"{container}: port {port} is not published on 127.0.0.1 ({out})")
    return hp


def running(container):
    r = docker("inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", container, check_rc=False)
    return r.stdout.strip()


def logs(container, tail=60):
    r = docker("logs", "--tail", str(tail), container, check_rc=False, timeout=30)
    return (r.stdout + r.stderr).strip()


def probe_url(port_map, hostports, probe):
    g = probe["httpGet"]
    port = g["port"]
    cport = port_map[port] if isinstance(port, str) else int(port)
    return f"http://{hostports[cport]}{g['path']}", cport


def wait_probe(container, url, probe, what):
    """Polls like the kubelet: initialDelaySeconds, then every periodSeconds up to
    failureThreshold attempts (bounded to 120 s)."""
    period = probe.get("periodSeconds", 10)
    budget = min(120, probe.get("initialDelaySeconds", 0) + period * probe.get("failureThreshold", 3))
    deadline = time.monotonic() + budget
    time.sleep(min(probe.get("initialDelaySeconds", 0), 10))
    last = None
    while time.monotonic() < deadline:
        state = running(container)
        if not state.startswith("true"):
            raise Failure(f"{what}: the container stopped ({state}); logs:\n{logs(container)}")
        last = http(url, timeout=probe.get("timeoutSeconds", 1) + 1)
        if last[0] == 200:
            return last
        time.sleep(min(period, 2))
    raise Failure(f"{what}: {url} not 200 within {budget} s (last: {last}); logs:\n{logs(container)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--rendered", required=True)
    ap.add_argument("--release", default="chat")
    ap.add_argument("--namespace", default="crm-chat")
    ap.add_argument("--run-id", required=True, help="label value of every container and network")
    ap.add_argument("--name", required=True, help="name of this value set, part of container names")
    ap.add_argument("--tmp", required=True)
    args = ap.parse_args()

    render = Render(args.rendered, args.release, args.namespace)
    deps = render.all("Deployment")
    check(len(deps) == 1, f"one Deployment in the render ({deps[0]['metadata']['name'] if deps else '-'})")
    dep = deps[0]
    fullname = dep["metadata"]["name"]
    tmpl = dep["spec"]["template"]
    spec = tmpl["spec"]
    selector = dep["spec"]["selector"]["matchLabels"]
    check(tmpl["metadata"].get("labels") == selector,
          f"pod template labels are the selector labels only: {tmpl['metadata'].get('labels')}")
    check(spec.get("enableServiceLinks") is False, "the pod spec turns service links off")
    hooks = [c["name"] for c in spec["containers"] if (c.get("lifecycle") or {}).get("preStop")]
    check(not hooks, "no preStop hook (the server's shutdown delay replaces it)")

    # The chat auth Secret the chart renders gets fresh 40-character values, as a
    # user's own secrets would be; any other rendered Secret (Valkey) is used as is.
    overrides = {}
    auth = render.find("Secret", fullname)
    if auth is not None:
        overrides[fullname] = {k: gen_secret(40) for k in secret_data(auth)}
    pod_name = f"{fullname}-7c9d8f6b5d-x2k4q"
    pod = Pod(render, dep, "crm-chat", pod_name, overrides, args.tmp)

    env = pod.env()
    links = service_links(render)
    prefix = args.release.upper().replace("-", "_") + "_CRM_CHAT_"
    check(any(k.startswith(prefix) for k in links),
          f"service-link variables of release '{args.release}' look like settings: "
          + ", ".join(sorted(k for k in links if k.startswith(prefix))[:4]) + ", ...")
    for k in links:
        if k in env:
            raise Failure(f"service link {k} collides with a rendered variable")
    env = {**links, **env}

    sec_flags, seen = pod.security()
    want = {"user": "65532:65532", "read_only": True, "cap_drop_all": True, "no_new_privileges": True}
    check(all(seen.get(k) == v for k, v in want.items()),
          f"securityContext: uid/gid 65532, read-only root, drop ALL, no privilege escalation ({seen})")
    mount_flags, files = pod.mounts()
    ports = pod.ports()
    check({"http", "internal"} <= set(ports), f"container ports http and internal: {ports}")
    entry, rest = pod.command_args()

    def resolved(name):
        if name in env:
            return env[name]
        f = env.get(name + "_FILE")
        return files.get(f) if f else None

    jwt_secret, api_key = resolved("CHAT_AUTH__JWT_SECRET"), resolved("CHAT_AUTH__API_KEY")
    check(bool(jwt_secret) and bool(api_key), "the pod gets the JWT secret and the API key "
          + ("as files" if "CHAT_AUTH__JWT_SECRET_FILE" in env else "as environment values"))

    base = f"podtest-{args.run_id}-{args.name}"
    network = base
    docker("network", "create", "--label", f"{LABEL}={args.run_id}", network)

    # --- the bundled Valkey, when the chat pod points at it ------------------------
    sts = render.find("StatefulSet")
    if "CHAT_VALKEY__URL" in env and sts is not None:
        vsvc = next(s for s in render.all("Service")
                    if s["metadata"]["name"] == sts["metadata"]["name"])["metadata"]["name"]
        vpod = Pod(render, sts, "valkey", f"{sts['metadata']['name']}-0", {}, args.tmp)
        vflags, _ = vpod.security()
        vmounts, vfiles = vpod.mounts()
        ventry, vrest = vpod.command_args()
        vname = run_container(args, args.run_id, f"{base}-valkey", network, vsvc,
                              vpod.pod_name, vpod.env(), vflags + vmounts + vpod.memory_flags(),
                              vpod.container["image"], ventry, vrest)
        say(f"Valkey: {vpod.container['image']} as Service {vsvc} ({' '.join(vflags)})")
        deadline = time.monotonic() + 60
        while True:
            r = docker("exec", vname, "valkey-cli", "ping", check_rc=False, timeout=10)
            if r.stdout.strip() == "PONG":
                break
            if time.monotonic() > deadline or not running(vname).startswith("true"):
                raise Failure(f"Valkey not answering PING: {r.stdout}{r.stderr}\n{logs(vname)}")
            time.sleep(1)
        conf = next(v for k, v in vfiles.items() if k.endswith("valkey.conf"))
        want_max = re.search(r"^maxmemory (\S+)", conf, re.M).group(1)
        got = docker("exec", vname, "valkey-cli", "config", "get", "maxmemory").stdout.split()
        pol = docker("exec", vname, "valkey-cli", "config", "get", "maxmemory-policy").stdout.split()
        check(got[-1] == want_max and pol[-1] == "noeviction" and int(want_max) > 0,
              f"Valkey runs with maxmemory {got[-1]} (as rendered) and {pol[-1]}")
    elif "CHAT_VALKEY__URL" in env:
        raise Failure("the values point at an external Valkey: not supported by this test")

    # --- the chat pod ------------------------------------------------------------------
    publish = []
    for p in ports.values():
        publish += ["-p", f"127.0.0.1::{p}"]
    chat = run_container(args, args.run_id, f"{base}-chat", network, fullname, pod_name,
                         env, sec_flags + mount_flags + pod.memory_flags() + publish, args.image, entry, rest)
    say(f"chat: docker run {' '.join(sec_flags + pod.memory_flags())} ... {args.image} "
        f"({len(env)} variables, {len(links)} of them service links)")
    hostports = {p: published(chat, p) for p in ports.values()}
    public = f"http://{hostports[ports['http']]}"
    internal = f"http://{hostports[ports['internal']]}"
    c = pod.container

    for kind, key in (("startup", "startupProbe"), ("liveness", "livenessProbe"), ("readiness", "readinessProbe")):
        probe = c.get(key)
        check(probe is not None and "httpGet" in probe, f"{kind} probe is an httpGet")
        url, cport = probe_url(ports, hostports, probe)
        check(cport == ports["internal"], f"{kind} probe uses the internal port ({cport})")
        status, body = wait_probe(chat, url, probe, f"{kind} probe")
        check(status == 200, f"{kind} probe {probe['httpGet']['path']} answers 200: {body.strip()[:80]}")

    log = logs(chat, 200)
    check("unknown field" not in log, "no 'unknown field' in the log (service-link variables tolerated)")

    bearer = {"Authorization": f"Bearer {api_key}"}
    for path in ("/api/v1/conversations/general", "/api/v1/users/alice/conversations", "/metrics",
                 "/healthz", "/readyz"):
        status, _ = http(public + path, bearer)
        check(status == 404, f"public port: {path} is 404 ({status})")
    for path in ("/", "/static/chat.js"):
        status, _ = http(public + path)
        check(status == 200, f"public port: {path} is 200")
    status, body = http(internal + "/api/v1/users/alice/conversations", bearer)
    check(status == 200, f"internal port: service API answers with the key ({status} {body[:60]})")
    status, _ = http(internal + "/api/v1/users/alice/conversations")
    check(status == 401, f"internal port: service API without the key is 401 ({status})")
    status, body = http(internal + "/metrics")
    check(status == 200 and "chat_connections" in body, "internal port: /metrics")

    # --- a chat through the public port -------------------------------------------------
    ws_url = public.replace("http://", "ws://") + "/ws/chat"
    stack = contextlib.ExitStack()
    bob, _ = hello(stack, ws_url, jwt_secret, "bob", "Bob")
    alice, wa = hello(stack, ws_url, jwt_secret, "alice", "Alice")
    convs = [x["id"] for x in wa.get("conversations", [])]
    check("general" in convs, f"welcome for alice lists {convs}")
    cmid = f"{base}-1"
    alice.send(json.dumps({"type": "send", "id": 2, "conversation": "general", "client_msg_id": cmid,
                           "body": "hello from the pod test"}))
    ack, _ = recv_until(alice, lambda f: f.get("type") in ("ack", "error") and f.get("id") == 2, "ack")
    check(ack["type"] == "ack" and ack["seq"] >= 1, f"alice's send is acked: seq {ack.get('seq')} ({ack})")
    m, _ = recv_until(bob, lambda f: f.get("type") == "message" and f.get("client_msg_id") == cmid, "message")
    check(m["sender"]["id"] == "alice" and m["seq"] == ack["seq"], f"bob gets alice's message, seq {m['seq']}")
    alice.close()

    # --- SIGTERM: not ready at once, drain with 1012, exit 0 within the grace period -----
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    delay = int(env.get("CHAT_SERVER__SHUTDOWN_DELAY_S", "5"))
    ready_url, _ = probe_url(ports, hostports, c["readinessProbe"])
    live_url, _ = probe_url(ports, hostports, c["livenessProbe"])
    t0 = time.monotonic()
    docker("kill", "--signal", "TERM", chat)
    status = None
    while time.monotonic() - t0 < max(delay, 1):
        status, _ = http(ready_url, timeout=2)
        if status == 503:
            break
        time.sleep(0.2)
    check(status == 503, f"SIGTERM: readiness is 503 after {time.monotonic() - t0:.1f} s "
          f"(shutdown delay {delay} s)")
    status, _ = http(live_url, timeout=2)
    check(status == 200, "during the shutdown delay liveness still answers 200")
    code = None
    try:
        while time.monotonic() - t0 < grace:
            bob.recv(timeout=max(0.1, grace - (time.monotonic() - t0)))
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
    except TimeoutError:
        pass
    check(code == 1012, f"bob's connection is closed with 1012 after {time.monotonic() - t0:.1f} s ({code})")
    while time.monotonic() - t0 < grace + 2 and running(chat).startswith("true"):
        time.sleep(0.25)
    state = running(chat)
    check(state == "false 0", f"the process exits 0 after {time.monotonic() - t0:.1f} s, within "
          f"terminationGracePeriodSeconds {grace} ({state})")
    stack.close()
    warn = [line for line in logs(chat, 400).splitlines() if "CHAT_CRM_CHAT" in line]
    if warn:
        say(f"the server's word on the service links: {warn[0][:300]}")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"pod-test: FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
