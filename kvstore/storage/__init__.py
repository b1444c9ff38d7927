"""LMDB storage engine: values, revisions and the applied index (knows nothing of Raft)."""
