"""One log line per accepted generate request, in the Ingress log (Serve's replica log files).

Data flow: both front ends call `log_request(request, log_prompts)` once the request is parsed
and admitted. The line names the request id, model, tenant (API key name) and prompt size; the
prompt text itself (or the chat messages) only when the config's `log_prompts` is true, since
prompts may hold personal data. API keys are never part of a GenerateRequest, so never logged.
"""

from __future__ import annotations

import logging

from shardserve.cluster.messages import GenerateRequest

logger = logging.getLogger("ray.serve")


def log_request(request: GenerateRequest, log_prompts: bool) -> None:
    if request.messages is not None:
        size = f"{len(request.messages)} messages"
        text = repr(request.messages)
    elif isinstance(request.prompt, str):
        size = f"{len(request.prompt)} chars"
        text = repr(request.prompt)
    else:
        size = f"{len(request.prompt or ())} token ids"
        text = repr(request.prompt)
    line = f"request {request.request_id} model={request.model} tenant={request.tenant} prompt={size}"
    logger.info(f"{line}: {text}" if log_prompts else line)
