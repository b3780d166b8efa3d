"""KV-aware routing: the KV index, prompt hashing, the cost model and P/D decision, and the
Ray Serve shells (ingress request router, pool request routers, replica-side publishers)."""
