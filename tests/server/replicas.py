"""Two kiln replicas behind nginx (run by tests/server.rs): both serve requests, and stopping
one replica (SIGTERM) mid-run loses no request: streams it had started finish (it drains), and
requests it no longer accepts go to the other replica.

Usage: replicas.py URL_A URL_B PID_A NGINX TMPDIR
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

url_a, url_b, pid_a, nginx, tmp = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
port_a, port_b = url_a.rsplit(":", 1)[1], url_b.rsplit(":", 1)[1]
work = os.path.join(tmp, f"kiln-nginx-{os.getpid()}")
os.makedirs(work, exist_ok=True)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
conf = os.path.join(work, "nginx.conf")
with open(conf, "w") as f:
    f.write(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format upstream '$upstream_addr $status';
    access_log {work}/access.log upstream;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    upstream kiln {{
        server 127.0.0.1:{port_a} max_fails=1 fail_timeout=30s;
        server 127.0.0.1:{port_b} max_fails=1 fail_timeout=30s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://kiln;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_read_timeout 300s;
            # A replica that refuses the connection (stopping) or answers 503 (draining, busy):
            # try the other. Safe for POST: the request never reached a model.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 2;
        }}
    }}
}}
""")
proc = subprocess.Popen([nginx, "-c", conf, "-p", work], stderr=subprocess.PIPE)
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(base + "/health", timeout=5)
        break
    except Exception:
        assert time.time() < deadline and proc.poll() is None, "nginx did not start"
        time.sleep(0.2)


def complete(prompt, stream, max_tokens):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, r.read().decode()


def upstreams():
    with open(os.path.join(work, "access.log")) as f:
        return [line.split()[0] for line in f if line.strip()]


try:
    # Round robin: both replicas serve.
    for i in range(6):
        status, body = complete(f"Request number {i}", False, 4)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4, body
    served = upstreams()
    assert any(port_a in u for u in served) and any(port_b in u for u in served), served

    # Streams in flight on both, then replica A is stopped while more requests arrive.
    results, errors = [], []

    def run(i):
        try:
            status, body = complete(f"Stream number {i}", True, 40)
            data = [l[6:] for l in body.splitlines() if l.startswith("data: ")]
            assert status == 200 and data[-1] == "[DONE]", body[-300:]
            finish = json.loads(data[-2])["choices"][0]["finish_reason"]
            assert finish == "length", data[-2]
            results.append(i)
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(pid_a, signal.SIGTERM)
    time.sleep(0.3)
    for i in range(6, 14):
        t = threading.Thread(target=run, args=(i,))
        t.start()
        threads.append(t)
        time.sleep(0.1)
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert sorted(results) == list(range(14)), results
    print(f"replicas: {len(results)} streams completed; upstreams: {upstreams()[-14:]}")
finally:
    proc.terminate()
    proc.wait(30)
print("replicas: all checks passed")
