"""Drives `deepeyes serve` with the official `openai` SDK, as a user's five-line client would.

    python openai_sdk_client.py BASE_URL MODEL IMAGE QUESTION

Asks once without streaming and once streaming (same seed), checks that both give the same
answer and reasoning, and prints a JSON summary for the Rust test that started the server.
"""

import base64
import json
import sys

from openai import OpenAI

base_url, model, image_path, question = sys.argv[1:5]
with open(image_path, "rb") as f:
    data_url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
messages = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_url}},
        ],
    }
]
client = OpenAI(base_url=base_url, api_key="not-needed")

whole = client.chat.completions.create(
    model=model, messages=messages, temperature=1.0, seed=7, max_tokens=64
)
message = whole.choices[0].message
reasoning = message.model_extra["reasoning_content"]
episode = whole.choices[0].model_extra["deepeyes"]

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    temperature=1.0,
    seed=7,
    max_tokens=64,
    stream=True,
    stream_options={"include_usage": True},
)
content, streamed_reasoning, finish, usage, turns = "", "", None, None, 0
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        delta = choice.delta
        content += delta.content or ""
        streamed_reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        if "turn" in ((choice.model_extra or {}).get("deepeyes") or {}):
            turns += 1
        finish = choice.finish_reason or finish

assert content == message.content, (content, message.content)
assert streamed_reasoning == reasoning, (streamed_reasoning, reasoning)
assert finish == whole.choices[0].finish_reason, (finish, whole.choices[0].finish_reason)
assert usage is not None and usage.total_tokens == whole.usage.total_tokens, (usage, whole.usage)
assert turns == len(episode["turns"]), (turns, episode["turns"])

models = [m.id for m in client.models.list()]
print(
    json.dumps(
        {
            "content": message.content,
            "finish_reason": whole.choices[0].finish_reason,
            "turns": len(episode["turns"]),
            "completion_tokens": whole.usage.completion_tokens,
            "models": models,
        }
    )
)
