"""Key routing: consistent hashing from keys to shard ids."""
