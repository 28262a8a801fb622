"""The official openai Python client choosing LoRA adapters as models (run by tests/server.rs).

Usage: lora_client.py BASE_URL PROMPT BASE_TEXT ADAPTER_A_TEXT
The server runs llama3-tiny with --lora adapter-a --lora adapter-b; the texts are `kiln generate`'s
greedy continuations without and with adapter-a. Every check asserts.
"""
import sys

import openai

base, prompt, base_text, adapter_text = sys.argv[1:5]
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

ids = [m.id for m in client.models.list().data]
assert ids == ["llama3-tiny", "llama3-tiny:adapter-a", "llama3-tiny:adapter-b"], ids

for model, want in [("llama3-tiny", base_text), ("llama3-tiny:adapter-a", adapter_text), ("adapter-a", adapter_text)]:
    c = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert c.choices[0].text == want, (model, c.choices[0].text, want)
    echoed = "llama3-tiny" if model == "llama3-tiny" else "llama3-tiny:adapter-a"
    assert c.model == echoed, (model, c.model)

# Streamed through the other adapter: a different continuation, echoed model name.
pieces = []
for chunk in client.completions.create(model="llama3-tiny:adapter-b", prompt=prompt, max_tokens=12, temperature=0, stream=True):
    assert chunk.model == "llama3-tiny:adapter-b", chunk.model
    pieces.extend(ch.text for ch in chunk.choices)
assert "".join(pieces) not in (base_text, adapter_text), pieces

try:
    client.completions.create(model="llama3-tiny:nope", prompt=prompt, max_tokens=4)
    raise AssertionError("an unknown adapter must be refused")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
    assert "llama3-tiny:adapter-a" in e.body["message"], e.body
print("lora_client: all checks passed")
