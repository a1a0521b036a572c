"""The OpenAI-compatible aiohttp server (`server.app.build_app`, `jaxllm serve`)."""
