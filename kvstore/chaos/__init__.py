"""Fault injection for tests: link faults between Raft replicas (proxy) and process faults."""
