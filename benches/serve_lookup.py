"""Time greedy chat requests against a running `kiln serve` (benches/RESULTS.md: speculation in
the server): N concurrent requests that ask to rewrite a Rust function, 96 tokens each; prints
aggregate tok/s and whether every reply is the same text (its hash, to compare across runs).

Usage: python3 benches/serve_lookup.py PORT STREAMS [SOURCE_FILE]
"""
import json, sys, time, threading, urllib.request
port, streams = int(sys.argv[1]), int(sys.argv[2])
code = open(sys.argv[3] if len(sys.argv) > 3 else 'src/engine/lookup.rs').read()[-900:]
msg = "Rewrite this Rust function with clearer variable names, keeping everything else the same:\n\n" + code
body = json.dumps({"messages": [{"role": "user", "content": msg}], "max_tokens": 96, "temperature": 0}).encode()
def one(out):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
    t = time.time(); v = json.load(urllib.request.urlopen(req)); out.append((time.time() - t, v["usage"]["completion_tokens"], v["choices"][0]["message"]["content"]))
# warm-up
w = []; one(w)
res = []; th = [threading.Thread(target=one, args=(res,)) for _ in range(streams)]
t0 = time.time(); [x.start() for x in th]; [x.join() for x in th]; wall = time.time() - t0
toks = sum(r[1] for r in res)
import hashlib; print(f"streams {streams}: {toks} tokens in {wall:.2f} s = {toks / wall:.2f} tok/s; texts equal: {len(set(r[2] for r in res)) == 1}; text {hashlib.sha256(res[0][2].encode()).hexdigest()[:12]}")
