"""Tool-calling test fixtures: TOOL_TEMPLATE, a small hermes-style chat template (the shape of
Qwen2.5's) that renders `tools`, assistant `tool_calls` (arguments with `tojson`, so they must
arrive as dicts) and `tool` results; a weather tool and conversations; a real SmolLM2 server."""

TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for tc in m.tool_calls %}\n<tool_call>\n"
    "{\"name\": \"{{ tc.function.name }}\", \"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response id=\"{{ m.tool_call_id }}\">\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": 'You can call tools. To call one, answer with <tool_call>{"name": ..., '
                                       '"arguments": {...}}</tool_call>.'}
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TWO_TURNS = [SYSTEM, QUESTION, {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 18, "unit": "C"}'}]


def smollm2_server(tmp_path_factory, *extra: str):
    """A real `python -m ascend_llm.server.api_server` on the bundled SmolLM2 GGUF with TOOL_TEMPLATE,
    as tests/server/test_openai_sdk.py starts one; yields its base URL, killed at the end."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.server.test_openai_sdk import _free_port
    from tests.server_process import wait_healthy

    root = Path(__file__).resolve().parents[2]
    port = _free_port()
    log = tmp_path_factory.mktemp("tool_server") / "server.log"
    cmd = [sys.executable, "-m", "ascend_llm.server.api_server", "--max-model-len", "1024", "--port", str(port),
           "--device", "cpu", "--kv-cache-memory-gb", "0.1", "--chat-template", TOOL_TEMPLATE, *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                env={**os.environ, "PYTHONPATH": str(root)})
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        print(log.read_text(errors="replace")[-3000:])     # shown by pytest when a test failed
        proc.kill()
        proc.wait(10)
