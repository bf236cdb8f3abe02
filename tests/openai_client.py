"""Drives the daemon's HTTP API with OpenAI's own Python package, as a user would.

usage: openai_client.py BASE_URL MODEL QUESTION PROMPT
Prints one JSON object of what came back; the Rust test checks it.
"""

import json
import sys

import openai

base_url, model, question, prompt = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="not-needed-on-loopback")
messages = [{"role": "user", "content": question}]
out = {}

r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
out["chat"] = r.choices[0].message.content
out["chat_finish"] = r.choices[0].finish_reason
out["chat_tokens"] = r.usage.completion_tokens

parts, usage = [], None
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    temperature=0,
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
out["chat_stream"] = "".join(parts)
out["chat_stream_usage"] = usage

r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=16)
out["completion"] = r.choices[0].text

out["models"] = [m.id for m in client.models.list()]

r = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
)
out["logprobs"] = [
    {"token": t.token, "logprob": t.logprob, "top": [x.token for x in t.top_logprobs]}
    for t in r.choices[0].logprobs.content
]

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
    out["unknown_model"] = "no error"
except openai.NotFoundError:
    out["unknown_model"] = "NotFoundError"

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=1, n=2)
    out["bad_field"] = "no error"
except openai.BadRequestError:
    out["bad_field"] = "BadRequestError"

try:
    client.completions.create(model=model, prompt="word " * 400, max_tokens=1)
    out["too_long"] = "no error"
except openai.APIStatusError as e:
    out["too_long"] = f"APIStatusError {e.status_code}"

print(json.dumps(out))
