"""The official openai Python client against `kiln serve` (run by tests/server.rs).

Usage: openai_client.py BASE_URL EXPECTED_GREEDY_TEXT PROMPT
Every check asserts; the script exits non-zero on the first failure.
"""
import sys

import openai

base, expected, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

models = client.models.list()
model = models.data[0].id
assert model, models

# Completions, not streamed, greedy: equal to `kiln generate` for the same prompt.
c = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
assert c.choices[0].text == expected, (c.choices[0].text, expected)
assert c.choices[0].finish_reason in ("length", "stop"), c
assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens > 0, c.usage
assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

# Completions, streamed: the same text, piece by piece.
pieces = []
finish = None
for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True):
    for ch in chunk.choices:
        pieces.append(ch.text)
        finish = ch.finish_reason or finish
assert "".join(pieces) == expected, ("".join(pieces), expected)
assert finish in ("length", "stop")

# Chat, not streamed, n=2 greedy: both choices equal; usage with cached prompt tokens (the
# second choice reuses the first's prompt blocks).
messages = [
    {"role": "system", "content": "You are a helpful assistant who answers briefly and to the point."},
    {"role": "user", "content": [{"type": "text", "text": "Name three colours of the rainbow, please."}]},
]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, n=2)
assert len(r.choices) == 2, r
assert r.choices[0].message.content == r.choices[1].message.content, r
assert r.choices[0].message.role == "assistant"
assert [c.index for c in r.choices] == [0, 1]
assert r.usage.completion_tokens % 2 == 0 and 2 <= r.usage.completion_tokens <= 16, r.usage
assert r.usage.prompt_tokens_details.cached_tokens > 0, r.usage

# Chat, streamed with include_usage: role first, content deltas, a finish chunk, then a usage
# chunk with no choices.
chunks = list(
    client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == r.choices[0].message.content, (text, r.choices[0].message.content)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == [r.choices[0].finish_reason], finishes
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens // 2, chunks[-1]

# Stop strings: the text stops before the stop string and never contains it.
full = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
stop = full[5:8]
assert len(stop) == 3, full
cut = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\u0000never"])
assert cut.choices[0].text == full[: full.index(stop)], (cut.choices[0].text, full, stop)
assert cut.choices[0].finish_reason == "stop"
streamed = "".join(
    ch.text for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stop=stop, stream=True)
    for ch in chunk.choices
)
assert streamed == cut.choices[0].text, (streamed, cut.choices[0].text)

# Log-probabilities: the greedy token is the most likely one, all values are log-probabilities.
lp = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
for entry in content:
    assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3, entry
    assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-6, entry
lpc = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
assert len(lpc.choices[0].logprobs.token_logprobs) == 3, lpc.choices[0].logprobs

# Sampling with a seed is reproducible; other parameters are accepted.
kw = dict(model=model, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=42,
          presence_penalty=0.5, frequency_penalty=0.2, extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
a = client.completions.create(**kw).choices[0].text
b = client.completions.create(**kw).choices[0].text
assert a == b, (a, b)

# A bad request is an OpenAI error the client raises as such.
try:
    client.chat.completions.create(model=model, messages=[], max_tokens=4)
    raise AssertionError("empty messages must fail")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "messages" in str(e), e

print("openai client: all checks passed")
