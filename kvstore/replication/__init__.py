"""Raft replication of shard state on top of pysyncobj."""
