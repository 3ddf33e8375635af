"""The node: a wasmtime-py host that runs Kinode-style packages compiled to Wasm components."""
