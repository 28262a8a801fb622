"""64 concurrent streaming clients against `kiln serve` (run by tests/server.rs on SmolLM2).

Usage: concurrency.py BASE_URL SERVER_PID
A fixed number of requests under a time limit: every stream must complete and equal the same
prompt's non-streamed greedy answer; then half of a second wave is cancelled mid-stream and the
KV pool must return to empty. The server's RSS is sampled throughout and must stay bounded.
"""
import asyncio
import sys
import time
import urllib.request

import openai

base, pid = sys.argv[1], int(sys.argv[2])
STREAMS, TOKENS, LIMIT_S = 64, 12, 900
client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=LIMIT_S)
rss_samples = []


def rss_mib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metric(name):
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


async def sample_rss(stop):
    while not stop.is_set():
        rss_samples.append(rss_mib())
        await asyncio.sleep(0.5)


def messages(i):
    return [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": f"Question {i}: what is {i} plus {i + 1}? Answer with one number."},
    ]


async def stream(i, cancel_after=None):
    text, chunks, finish = "", 0, None
    s = await client.chat.completions.create(
        model="m", messages=messages(i), max_tokens=TOKENS, temperature=0, stream=True
    )
    async for chunk in s:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if cancel_after is not None and chunks >= cancel_after:
            await s.close()
            return i, None, "cancelled"
    return i, text, finish


async def main():
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(stop))
    start = time.time()
    baseline = rss_mib()
    results = await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(STREAMS))), LIMIT_S)
    took = time.time() - start
    assert all(f in ("stop", "length") for _, _, f in results), [r for r in results if r[2] not in ("stop", "length")]
    # The same prompts again, not streamed (now mostly from the prefix cache): equal text.
    again = await asyncio.wait_for(
        asyncio.gather(
            *(client.chat.completions.create(model="m", messages=messages(i), max_tokens=TOKENS, temperature=0) for i in range(STREAMS))
        ),
        LIMIT_S,
    )
    for (i, text, _), r in zip(results, again):
        assert text == r.choices[0].message.content, (i, text, r.choices[0].message.content)
    assert sum(r.usage.prompt_tokens_details.cached_tokens for r in again) > 0, "the second wave hits the prefix cache"
    # A second wave: half cancel after two chunks.
    wave = await asyncio.wait_for(
        asyncio.gather(*(stream(i, cancel_after=2 if i % 2 else None) for i in range(STREAMS))), LIMIT_S
    )
    assert sum(1 for r in wave if r[2] == "cancelled") == STREAMS // 2
    for (i, text, f), (_, want, _) in zip(wave, results):
        if f != "cancelled":
            assert text == want, (i, text, want)
    # The cancelled sequences' blocks are freed: the pool returns to empty.
    deadline = time.time() + 120
    while metric("kiln_kv_blocks_used") > 0 or metric("kiln_running_sequences") > 0:
        assert time.time() < deadline, "the KV pool did not return to empty"
        await asyncio.sleep(0.5)
    assert metric('kiln_requests_total{outcome="cancelled"}') >= STREAMS // 2
    stop.set()
    await sampler
    peak = max(rss_samples)
    print(f"{STREAMS} streams in {took:.1f} s; RSS {baseline:.0f} MiB before, peak {peak:.0f} MiB")
    assert peak < baseline + 512, f"RSS grew from {baseline:.0f} to {peak:.0f} MiB"


asyncio.run(main())
print("concurrency: all checks passed")
