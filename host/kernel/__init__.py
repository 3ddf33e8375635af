"""The kernel: process table, routing, capabilities, the `standard` ABI bound to each Wasm process."""
