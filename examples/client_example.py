"""Ask the quota platform before calling a model, then report what the call really used.

    QUOTA_KEY=qk_... .venv/bin/python examples/client_example.py [USER] [MODEL]

QUOTA_URL defaults to http://127.0.0.1:8000 (what scripts/run serves; scripts/run prints a
demo key for tenant acme). The model call is a stand-in that answers like an OpenAI-style
server; put your own in its place. Exits 0 when the call ran, 3 when the quota denied it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from quota_platform.client import QuotaClient, QuotaExceeded  # noqa: E402


def call_model(model: str, prompt: str, max_tokens: int) -> dict:
    """Stands in for the inference call; returns what an OpenAI-style server returns."""
    reply = "Quotas protect shared GPUs from any one caller."
    return {
        "model": model,
        "choices": [{"message": {"role": "assistant", "content": reply}}],
        "usage": {"prompt_tokens": len(prompt) // 4 + 1, "completion_tokens": len(reply) // 4},
    }


def main() -> int:
    user = sys.argv[1] if len(sys.argv) > 1 else "demo-user"
    model = sys.argv[2] if len(sys.argv) > 2 else "gpt-4o"
    prompt = "In one sentence: why do inference platforms enforce quotas?"
    max_tokens = 64
    url = os.environ.get("QUOTA_URL", "http://127.0.0.1:8000")
    with QuotaClient(url, os.environ["QUOTA_KEY"], timeout=2.0, retries=2) as client:
        try:
            # The estimate: about four characters a token of prompt, plus the output allowed.
            with client.guard(user, model, tokens=len(prompt) // 4 + max_tokens) as guard:
                reply = call_model(model, prompt, max_tokens)
                usage = reply["usage"]
                guard.report(usage["prompt_tokens"], usage["completion_tokens"])
        except QuotaExceeded as denied:
            print(f"denied: {denied}")
            return 3
        print(f"reply: {reply['choices'][0]['message']['content']}")
        print(f"request {guard.request_id} used {sum(guard.usage or (0, 0))} tokens")
        for limit in client.quota(user, model)["limits"]:
            window = f" per {limit['window']} s" if isinstance(limit["window"], int) else ""
            print(f"  {limit['scope']} {limit['metric']}{window}: {limit['remaining']} left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
