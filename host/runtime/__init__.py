"""Wasmtime: the engine, component loading and caching, fast value conversion."""
