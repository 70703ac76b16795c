"""The local HTTP server: web UI, native /api, A1111 /sdapi/v1 and OpenAI /v1 over one job queue."""
